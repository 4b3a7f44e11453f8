"""The MusicGen language model: a decoder over K parallel codebooks with cross-attention to text.

One file, read top to bottom: config, attention, block, model. The model runs in two modes:
- `forward`: the whole (delay-interleaved) sequence at once, for training and tests;
- `setup_cache` + `prefill` + `decode_step`: generation with a static KV cache (gpt-fast style).

Both share one masking rule. A boolean `keep` (B, S) says which steps exist: a step that is not
kept (padding, or a dropped STAGE context) is invisible to every other step, and positions are
renumbered so that position 0 falls on the first kept step.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange


@dataclass
class LMConfig:
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    n_codebooks: int = 4
    card: int = 2048  # codes per codebook; also the id of the special start/gap token
    n_special: int = 1  # input-only tokens after the codes: 1 for MusicGen, 2 for STAGE (+ context token)
    text_dim: int = 768  # t5-base hidden size
    ffn_dim: int = 0  # 0 means 4 * dim
    norm_eps: float = 1e-5
    # Two ways the official STAGE checkpoints (x-transformers) differ from MusicGen; both off for MusicGen.
    zero_special_row: bool = False  # the special token's embedding row is zero and stays zero (padding_idx)
    attend_start_step: bool = True  # False: step 0, the all-special start step, is never attended to

    def __post_init__(self):  # a config file's values are checked where files are read (io/loading.py)
        if self.ffn_dim == 0:
            self.ffn_dim = 4 * self.dim
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")

    @property
    def vocab_in(self) -> int:
        return self.card + self.n_special

    @property
    def special_id(self) -> int:  # start step and delay-gap filler
        return self.card

    @property
    def context_id(self) -> int:  # STAGE's separator token
        return self.card + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "tiny": LMConfig(dim=256, n_layers=4, n_heads=4),
    "small": LMConfig(dim=1024, n_layers=24, n_heads=16),
    "medium": LMConfig(dim=1536, n_layers=48, n_heads=24),
    "large": LMConfig(dim=2048, n_layers=48, n_heads=32),
}


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) integer positions -> (..., dim) embeddings: cos half then sin half, in fp32.

    The frequency step divides by (half - 1), not half, as in MusicGen's checkpoints.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    phase = positions.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def without_start_step(keep: torch.Tensor | None, B: int, S: int, device) -> torch.Tensor:
    """`keep` with step 0 removed (STAGE masks the start step, which holds no code)."""
    keep = torch.ones(B, S, dtype=torch.bool, device=device) if keep is None else keep.clone()
    keep[:, 0] = False
    return keep


def positions_from_keep(keep: torch.Tensor) -> torch.Tensor:
    """Kept steps get positions 0, 1, 2, ...; dropped steps repeat their neighbour's (never seen)."""
    return (keep.long().cumsum(-1) - 1).clamp(min=0)


class KVCache(nn.Module):
    """Static keys/values for one self-attention layer, written in place at `input_pos`.

    Registered buffers so that CUDA graphs (torch.compile mode="reduce-overhead") can capture them.
    """

    def __init__(self, batch: int, n_heads: int, max_steps: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_heads, max_steps, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class SelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # fused q, k, v: one matmul instead of three
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, mask, input_pos=None):
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.n_heads)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(y, "b h s d -> b s (h d)"))


class CrossAttention(nn.Module):
    """Attention from the audio steps to the projected text states (no biases, so a zero text gives zero)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        # this generation's text keys/values (set by MusicGenLM.setup_cache), buffers for CUDA graphs
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def keys_values(self, text):
        return rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=self.n_heads)

    def forward(self, x, k, v, mask):
        q = rearrange(self.q(x), "b s (h d) -> b h s d", h=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(y, "b h s d -> b s (h d)"))


class Block(nn.Module):
    """Pre-norm layer: x += self_attn(norm(x)); x += cross_attn(norm(x), text); x += ffn(norm(x))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.norm_ffn = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_in = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.ffn_out = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x, self_mask, cross_k, cross_v, cross_mask, input_pos=None):
        x = x + self.self_attn(self.norm_self(x), self_mask, input_pos)
        # Rows past the text's (the unconditional half of a guidance batch, generate.guidance_batch) have
        # the all-zero null text, whose cross-attention output is exactly zero: skipped.
        n_text = cross_k.shape[0]
        h = self.cross_attn(self.norm_cross(x[:n_text]), cross_k, cross_v, cross_mask)
        x = torch.cat([x[:n_text] + h, x[n_text:]]) if n_text < x.shape[0] else x + h
        return x + self.ffn_out(F.gelu(self.ffn_in(self.norm_ffn(x))))


class MusicGenLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)  # t5 hidden -> model width (with bias)
        pad_row = cfg.special_id if cfg.zero_special_row else None
        self.embed = nn.ModuleList([nn.Embedding(cfg.vocab_in, cfg.dim, padding_idx=pad_row) for _ in range(cfg.n_codebooks)])
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm_out = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.heads = nn.ModuleList([nn.Linear(cfg.dim, cfg.card, bias=False) for _ in range(cfg.n_codebooks)])
        self.max_steps = 0  # size of the static cache, 0 when none is set up
        self.checkpoint_blocks = False  # training: recompute each block in the backward instead of keeping its activations
        # generation state, set by setup_cache: all of it buffers, so a compiled step sees fixed addresses
        for name in ("cross_mask", "cache_keep", "n_dropped", "step_ids"):
            self.register_buffer(name, None, persistent=False)

    # ---- conditioning -------------------------------------------------------------------------
    def project_text(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """T5 states (B, L, text_dim) -> (B, L, dim), padded positions zeroed."""
        return self.text_proj(text_states) * text_mask.unsqueeze(-1).to(text_states.dtype)

    def _cross_inputs(self, text, text_mask):
        """Per-layer cross keys/values and their key mask (B, 1, 1, L).

        A row without text (the null condition) has all-zero states, so its cross-attention output
        is exactly zero whatever it attends to: it gets an all-true mask (never an empty softmax).
        """
        text_mask = text_mask | ~text_mask.any(-1, keepdim=True)
        kvs = [layer.cross_attn.keys_values(text) for layer in self.layers]
        return kvs, text_mask[:, None, None, :]

    def _embed(self, codes, positions):
        x = sum(emb(codes[:, k]) for k, emb in enumerate(self.embed))
        return x + sinusoidal_positions(positions, self.cfg.dim).to(x.dtype)

    def _logits(self, x):
        x = self.norm_out(x)
        return torch.stack([head(x) for head in self.heads], dim=1)  # (B, K, S, card)

    # ---- full sequence ------------------------------------------------------------------------
    def forward(self, codes, text, text_mask, keep=None, first_logit: int = 0):
        """codes (B, K, S) interleaved ids; text (B, L, dim) projected; text_mask (B, L) bool;
        keep (B, S) bool or None. Returns logits (B, K, S - first_logit, card) of steps first_logit..:
        step s predicts step s+1 (training skips a STAGE context's logits: no loss reads them)."""
        B, K, S = codes.shape
        if not self.cfg.attend_start_step:
            keep = without_start_step(keep, B, S, codes.device)
        if keep is not None and bool(keep.all()):
            keep = None  # nothing dropped: the plain causal mask, which SDPA runs faster than an explicit one
        if keep is None:
            positions = torch.arange(S, device=codes.device).expand(B, S)
            self_mask = None  # plain causal
        else:
            positions = positions_from_keep(keep)
            causal = torch.ones(S, S, dtype=torch.bool, device=codes.device).tril()
            eye = torch.eye(S, dtype=torch.bool, device=codes.device)
            # a dropped step still sees itself so that its softmax row is never empty
            self_mask = ((causal & keep[:, None, :]) | eye)[:, None]
        kvs, cross_mask = self._cross_inputs(text, text_mask)
        x = self._embed(codes, positions)
        for layer, (k, v) in zip(self.layers, kvs):
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, self_mask, k, v, cross_mask, use_reentrant=False)
            else:
                x = layer(x, self_mask, k, v, cross_mask)
        return self._logits(x[:, first_logit:])

    # ---- cached generation --------------------------------------------------------------------
    def setup_cache(self, batch: int, max_steps: int, text, text_mask):
        """Allocate the static caches for `batch` rows and `max_steps` steps, and compute the
        cross-attention keys/values once for this generation. `text` may have fewer rows than
        `batch`: the rows after it (the unconditional half of a guidance batch) have the null text,
        whose cross-attention output is exactly zero, so none is computed for them.

        A cache of the same size, dtype and device is reused in place, so that a compiled (CUDA-graph)
        step keeps reading and writing the same memory from one generation to the next."""
        p = next(self.parameters())
        kvs, cross_mask = self._cross_inputs(text, text_mask)
        cache = self.layers[0].self_attn.kv_cache
        reuse = cache is not None and cache.k.shape == (batch, self.cfg.n_heads, max_steps, self.cfg.head_dim) \
            and cache.k.dtype == p.dtype and cache.k.device == p.device
        for layer, (k, v) in zip(self.layers, kvs):
            if not reuse:
                layer.self_attn.kv_cache = KVCache(batch, self.cfg.n_heads, max_steps, self.cfg.head_dim, p.dtype, p.device)
            _assign(layer.cross_attn, "cache_k", k)
            _assign(layer.cross_attn, "cache_v", v)
        _assign(self, "cross_mask", cross_mask)
        _assign(self, "cache_keep", torch.ones(batch, max_steps, dtype=torch.bool, device=p.device))
        _assign(self, "n_dropped", torch.zeros(batch, dtype=torch.long, device=p.device))
        _assign(self, "step_ids", torch.arange(max_steps, device=p.device))
        self.max_steps = max_steps

    def clear_cache(self):
        """Free the caches (a later setup_cache allocates new ones)."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None
            layer.cross_attn.cache_k = layer.cross_attn.cache_v = None
        self.cross_mask = self.cache_keep = self.n_dropped = self.step_ids = None
        self.max_steps = 0

    def _cached(self, codes, input_pos, positions):
        # step i may see cached step j when j <= i and j is kept (and always itself)
        visible = (self.step_ids <= input_pos[:, None]) & self.cache_keep[:, None, :]
        visible = visible | (self.step_ids == input_pos[:, None])
        x = self._embed(codes, positions)
        for layer in self.layers:
            x = layer(x, visible[:, None], layer.cross_attn.cache_k, layer.cross_attn.cache_v, self.cross_mask, input_pos)
        return x

    def prefill(self, codes, keep=None):
        """Run steps 0..P-1 into the cache; returns logits (B, K, card) of the last step."""
        B, K, P = codes.shape
        if not self.cfg.attend_start_step:
            keep = without_start_step(keep, B, P, codes.device)
        if keep is not None:
            self.cache_keep[:, :P] = keep
            self.n_dropped.copy_((~keep).sum(-1))
        positions = positions_from_keep(self.cache_keep[:, :P])
        x = self._cached(codes, torch.arange(P, device=codes.device), positions)
        return self._logits(x[:, -1:])[:, :, 0]

    def decode_step(self, codes, input_pos):
        """codes (B, K, 1) at step `input_pos` (a 1-element long tensor) -> logits (B, K, card).

        Pure tensor code with static shapes and no host read: the function to torch.compile."""
        positions = (input_pos - self.n_dropped)[:, None]
        return self._logits(self._cached(codes, input_pos, positions))[:, :, 0]


def _assign(module: nn.Module, name: str, value: torch.Tensor):
    """Set a buffer, copying in place when the old one has the same shape, dtype and device."""
    old = getattr(module, name)
    if old is not None and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device:
        old.copy_(value)
    else:
        setattr(module, name, value.contiguous())
