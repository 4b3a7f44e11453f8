"""LoRA adapters on the LM's nn.Linear layers, plus a trainable context-token row, for fine-tuning the
sizes whose full AdamW state does not fit one GPU (docs/training.md, "LoRA").

    spec = LoraSpec(rank=16, alpha=32.0, dropout=0.0, targets=("q", "k", "v", "out"))
    add_adapters(lm, spec)      # everything else frozen; lm.state_dict() keys of the base unchanged
    adapter_state(lm)           # what a run folder stores: the adapters and the context rows, a few MB

A target names a slice of a weight, as in the original (loralib on x-transformers' to_q/to_k/to_v/to_out of
every self- and cross-attention): our q, k and v are fused (self_attn.qkv, cross_attn.kv), so each target
gets its own rank-r pair (A, B) on its rows of the fused weight, stored as `<layer>.lora_a.<first row>` and
`<layer>.lora_b.<first row>`: W[first:first + len(B)] += alpha / r * B @ A. That name says everything a
merge needs (io/formats.merge_adapters), so loading a run folder needs no knowledge of the targets.

Why not peft: it would wrap each nn.Linear as a whole, so a q-only or k,v-only adapter on our fused layers
is out of reach, it renames the base weights (base_layer.weight), and it is one more dependency for ~70 lines.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import MusicGenLM

TARGETS = ("q", "k", "v", "out", "ffn")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = ("q", "k", "v", "out")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear (same `weight` Parameter, same state-dict key) plus one low-rank update per
    row slice: y = x W^T + sum_s scale * (drop(x) A_s^T B_s^T) on rows s. B starts at zero: the
    adapted model starts as the base. Not an nn.Linear subclass, so that nothing that rewrites
    Linear layers (generate.fast_cpu_decode) can drop the adapters."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]], spec: LoraSpec):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale, self.drop = spec.scale, nn.Dropout(spec.dropout)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.ParameterDict({str(s): nn.Parameter(torch.empty(spec.rank, self.in_features, **like)) for s, _ in slices})
        self.lora_b = nn.ParameterDict({str(s): nn.Parameter(torch.zeros(e - s, spec.rank, **like)) for s, e in slices})
        for a in self.lora_a.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # loralib's and peft's init of A
        self.firsts = sorted(s for s, _ in slices)  # the slices top to bottom (a ParameterDict's order is its own)

    def forward(self, x):
        h = self.drop(x) if self.drop.p else x
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(h, self._a()), self._b()) * self.scale

    def _a(self) -> torch.Tensor:
        return torch.cat([self.lora_a[str(s)] for s in self.firsts])  # (n r, in): every slice's A, one matmul

    def _b(self) -> torch.Tensor:
        """(out, n r): slice s's B in its rows and its own r columns, zeros elsewhere (small: r columns per slice)."""
        n, blocks, row = len(self.firsts), [], 0
        for i, s in enumerate(self.firsts):
            b = self.lora_b[str(s)]
            r = b.shape[1]
            blocks += [b.new_zeros(s - row, n * r)] if s > row else []
            blocks.append(F.pad(b, (i * r, (n - 1 - i) * r)))
            row = s + b.shape[0]
        blocks += [blocks[-1].new_zeros(self.out_features - row, blocks[-1].shape[1])] if row < self.out_features else []
        return torch.cat(blocks)


class ContextRowEmbedding(nn.Embedding):
    """A frozen embedding table whose STAGE context-token row is a trainable Parameter of its own
    (`context_row`): weight decay and updates never touch the other rows."""

    def __init__(self, base: nn.Embedding, context_id: int):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.padding_idx = base.num_embeddings, base.embedding_dim, base.padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.weight, self.context_id = base.weight, context_id
        self.context_row = nn.Parameter(base.weight.detach()[context_id].clone())

    def forward(self, ids):
        out = F.embedding(ids, self.weight, self.padding_idx)
        return torch.where((ids == self.context_id)[..., None], self.context_row.to(out.dtype), out)


def _slices(name: str, dim: int, targets) -> list[tuple[int, int]]:
    """Row slices of one of a block's Linear layers that the targets adapt."""
    parts = {"self_attn.qkv": ("q", "k", "v"), "cross_attn.q": ("q",), "cross_attn.kv": ("k", "v"),
             "self_attn.out": ("out",), "cross_attn.out": ("out",), "ffn_in": ("ffn",), "ffn_out": ("ffn",)}[name]
    if name in ("ffn_in", "ffn_out"):
        return [(0, -1)] if "ffn" in targets else []
    return [(i * dim, (i + 1) * dim) for i, t in enumerate(parts) if t in targets]


def add_adapters(lm: MusicGenLM, spec: LoraSpec) -> MusicGenLM:
    """Freeze the whole LM, then add trainable adapters on the targets of every block and a trainable
    context-token row to each codebook's embedding (the STAGE token is new: the base never learnt it)."""
    lm.requires_grad_(False)
    for block in lm.layers:
        for name in ("self_attn.qkv", "self_attn.out", "cross_attn.q", "cross_attn.kv", "cross_attn.out", "ffn_in", "ffn_out"):
            parent, _, leaf = ("block." + name).rpartition(".")
            owner = block if parent == "block" else getattr(block, parent.split(".")[1])
            linear = getattr(owner, leaf)
            slices = [(s, linear.out_features if e < 0 else e) for s, e in _slices(name, lm.cfg.dim, spec.targets)]
            if slices:
                setattr(owner, leaf, LoRALinear(linear, slices, spec))
    for k, emb in enumerate(lm.embed):
        if lm.cfg.n_special >= 2:  # a STAGE LM (a plain MusicGen has no context token)
            lm.embed[k] = ContextRowEmbedding(emb, lm.cfg.context_id)
    return lm


def adapter_state(lm: MusicGenLM) -> dict:
    """The trained tensors only: what a LoRA run folder stores."""
    names = {n for n, p in lm.named_parameters() if p.requires_grad}
    return {k: v for k, v in lm.state_dict().items() if k in names}
