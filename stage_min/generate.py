"""Autoregressive sampling over a delay-interleaved grid with classifier-free guidance.

The whole loop stays on the device: sampling, guidance and forcing of known tokens (start step,
delay gaps, a STAGE prefix) are tensor ops, so no value is read back to the host per step.
"""
import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .model import MusicGenLM


@dataclass
class SamplingConfig:
    cfg_coef: float = 3.0  # classifier-free guidance; 1 disables the unconditional half
    top_k: int = 250  # 0 disables
    top_p: float = 0.0  # 0 disables
    temperature: float = 1.0

    def check(self):
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top-p must be in [0, 1], got {self.top_p}")
        if not 1 <= self.cfg_coef <= MAX_CFG:
            raise ValueError(f"guidance coefficient must be in [1, {MAX_CFG:g}], got {self.cfg_coef}")

    def changed(self) -> dict:
        """The settings that differ from the defaults (what a model's config.json "sampling" records)."""
        defaults = asdict(SamplingConfig())
        return {k: v for k, v in asdict(self).items() if v != defaults[k]}


MAX_CFG = 1e4  # far beyond any useful value; keeps the guided logits far from float32's range
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny  # below it a temperature acts as this one: greedy in effect


def sample(logits: torch.Tensor, sc: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (..., V) -> ids (...). top-k 1 is exactly greedy."""
    if sc.top_k == 1:
        return logits.argmax(-1)
    # the largest logit is moved to 0 first, so that a tiny temperature sends the others to -inf
    # (never 0 / 0 or inf - inf): the limit of sampling as the temperature goes to 0 is greedy
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(sc.temperature, MIN_TEMPERATURE)
    if sc.top_k > 0:
        kth = torch.topk(logits, min(sc.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < sc.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens above it already reach top_p (the first one always stays)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) > sc.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # argmax(p / q) with q ~ Exp(1) draws from p without torch.multinomial's host sync
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def guidance_batch(conditional: tuple, unconditional: tuple | None) -> tuple:
    """The row layout of classifier-free guidance, the one place it is decided:

        rows 0 .. B-1     conditional     the prompt's text   the context (STAGE)      } the same sampled
        rows B .. 2B-1    unconditional   the null text       no context (blanked)     } tokens: row b, B+b

    Each step, `guided` mixes the two halves' logits into B rows, one token per codebook is sampled
    for each, and generate_tokens writes it into both row b and row B + b. The null text is all zeros,
    so its cross-attention output is exactly zero: MusicGenLM.setup_cache keeps text keys for rows
    0..B-1 only, and each Block skips cross-attention for rows B.. (same numbers, half the work).

    conditional, unconditional: tuples of row-first tensors (grid, known, keep, ...); unconditional
    None means no guidance (cfg_coef 1): the B conditional rows alone."""
    if unconditional is None:
        return conditional
    return tuple(torch.cat([c, u]) for c, u in zip(conditional, unconditional))


def guided(logits: torch.Tensor, n_cond: int, cfg_coef: float) -> torch.Tensor:
    """[cond; uncond] logits (guidance_batch's rows) -> uncond + (cond - uncond) * cfg_coef on raw logits."""
    if logits.shape[0] == n_cond:
        return logits
    cond, uncond = logits[:n_cond].float(), logits[n_cond:].float()  # fp32: fp16 logits overflow at large cfg
    return uncond + (cond - uncond) * cfg_coef


@torch.no_grad()
def generate_tokens(
    lm: MusicGenLM,
    grid: torch.Tensor,
    known: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    sc: SamplingConfig,
    keep: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    step_fn=None,
    free_cache: bool = True,
) -> torch.Tensor:
    """Fill the unknown tokens of an interleaved grid; returns the B conditional rows (B, K, S).

    grid, known (R, K, S): token ids, taken as given where `known` is true (start step, delay gaps,
    a prefix); rows as guidance_batch lays them out (R = B, or 2B with guidance). text (B, L, dim)
    projected, text_mask (B, L): the B conditional rows' text (the others get the null text).
    keep (R, P): which of the first P steps exist (P = the prefilled part), None for all. step_fn replaces lm.decode_step (e.g. `compiled_step(lm)`).
    free_cache=False leaves the static cache allocated, for the next generation of the same size to
    reuse in place (what a CUDA-graph step wants).
    """
    R, K, S = grid.shape
    B = text.shape[0]
    if R not in (B, 2 * B) or (R == 2 * B) != (sc.cfg_coef != 1.0):
        raise ValueError(f"grid has {R} rows for {B} prompts; expected {2 * B if sc.cfg_coef != 1.0 else B}")
    grid = grid.clone()
    unknown_steps = (~known).any(1).any(0).nonzero()
    if len(unknown_steps) == 0:
        return grid[:B]
    first = int(unknown_steps[0])  # steps before this are given in every row: prefill them at once
    if first == 0:
        raise ValueError("step 0 (the start step) must be known")
    step_fn = step_fn or lm.decode_step
    lm.setup_cache(R, S, text, text_mask)  # rows B..R-1 get the null text (see setup_cache)
    try:
        logits = lm.prefill(grid[:, :, :first], None if keep is None else keep[:, :first])
        positions = torch.arange(S, device=grid.device)
        for s in tqdm(range(first, S), disable=not progress, desc="sampling codec frames", unit="frame", leave=False):
            next_ids = sample(guided(logits, B, sc.cfg_coef), sc, generator).repeat(R // B, 1)
            grid[:, :, s] = torch.where(known[:, :, s], grid[:, :, s], next_ids)
            if s + 1 < S:
                logits = step_fn(grid[:, :, s:s + 1], positions[s:s + 1])
    finally:
        if free_cache:
            lm.clear_cache()
    return grid[:B]


def compiled_step(lm: MusicGenLM, mode: str | None = None):
    """lm.decode_step under torch.compile, one graph (fullgraph=True) with static shapes.

    Default mode: "reduce-overhead" (CUDA graphs) on CUDA, inductor's default elsewhere. The first
    call of each new size compiles (seconds to minutes); pass the result as generate_tokens' step_fn
    (with free_cache=False so that the cache buffers keep their addresses between generations)."""
    if mode is None:
        mode = "reduce-overhead" if next(lm.parameters()).device.type == "cuda" else "default"
    return torch.compile(lm.decode_step, fullgraph=True, dynamic=False, mode=mode)


# ---- a speed switch: CPU decode steps ------------------------------------------------------------
class RowMajorLinear(torch.nn.Linear):
    """A bias-free nn.Linear whose product with a few rows (a decode step: 1-4 rows) on a CPU in fp32 is
    computed as (W @ x^T)^T. The sgemm path F.linear takes for so few rows reads the weight at a third to
    a half of memory bandwidth here; the transposed order streams it at about full speed, and a decode
    step is little else (bench.py --config small: 1.8x more steps/s). Same numbers up to float rounding,
    same state-dict names; more rows (training, prefill), other dtypes and devices take F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= 4 * x.shape[-1] and x.dtype == torch.float32 and x.device.type == "cpu":
            rows = x.reshape(-1, x.shape[-1]).contiguous()  # row-major rows: the fast kernel wants x^T column-major
            return (self.weight @ rows.T).T.reshape(*x.shape[:-1], self.out_features)
        return torch.nn.functional.linear(x, self.weight)


def fast_cpu_decode(lm: MusicGenLM, enabled: bool = True) -> MusicGenLM:
    """Switch every bias-free Linear of `lm` to RowMajorLinear (enabled) or back to nn.Linear: the
    model stays the model, only the CPU matmul order of decode steps changes. from_pretrained turns
    it on; a reader can leave it off and read model.py as plain PyTorch."""
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            module.__class__ = RowMajorLinear if enabled else torch.nn.Linear
    return lm
