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


def guided(logits: torch.Tensor, n_cond: int, cfg_coef: float) -> torch.Tensor:
    """[cond; uncond] logits -> uncond + (cond - uncond) * cfg_coef on raw logits."""
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
    a prefix). R = B without guidance; with guidance R = 2B: the B conditional rows, then B
    unconditional ones, each with its own given tokens (a STAGE context is blanked in the second
    half) but sharing the sampled ones. text (B, L, dim) projected, text_mask (B, L): the
    unconditional rows get the all-zero null text. keep (R, P): which of the first P steps exist
    (P = the prefilled part), None for all. step_fn replaces lm.decode_step (e.g. `compiled_step(lm)`).
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
