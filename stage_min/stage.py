"""STAGE's prefix: [context frames][separator frame][target frames], interleaved once as a whole.

The context and the target cover the same time span: target frame t plays with context frame t.
Contexts of different lengths are left-padded to a common length; padded frames, and the whole
context of a row whose context is dropped, hold the special token and their steps are removed
from attention (`keep`), so such a row sees exactly what a row with a shorter (or no) context sees.

Which steps are removed: step s holds frame s-1-k of codebook k. Steps 1..C put a context frame
in codebook 0; those of padded or dropped frames go. Later steps mix frames (codebook 0 may hold
the separator while codebook 3 still holds a context frame); they stay, and any padded or dropped
frame in them is the special token, which is also what the delay gap holds without a context.

Training reads the loss on target frames only (`target_loss`): the context is given, never predicted.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import delay
from .generate import guidance_batch
from .model import MusicGenLM


@dataclass
class StageSequence:
    grid: torch.Tensor  # (B, K, S) interleaved token ids
    keep: torch.Tensor  # (B, S) steps that exist
    known: torch.Tensor  # (B, K, S) tokens given before generation (everything but target frames)
    target: torch.Tensor  # (B, K, S) tokens that are target frames: the loss goes there only
    n_context: int  # C, the (padded) context length in frames


def build_sequence(
    context: torch.Tensor,
    target: torch.Tensor | None,
    n_target: int,
    special: int,
    context_id: int,
    context_lengths: torch.Tensor | None = None,
    drop_context: torch.Tensor | None = None,
) -> StageSequence:
    """context (B, K, C) codes, right-aligned when lengths differ (row b's real frames are its last
    context_lengths[b]); target (B, K, T) codes, or None to leave the target as special tokens for
    generation; drop_context (B,) bool removes a row's whole context."""
    B, K, C = context.shape
    device = context.device
    lengths = torch.full((B,), C, device=device) if context_lengths is None else context_lengths.to(device)
    if drop_context is not None:
        lengths = torch.where(drop_context.to(device), torch.zeros_like(lengths), lengths)
    real_context = torch.arange(C, device=device)[None, :] >= (C - lengths)[:, None]  # (B, C)
    context = torch.where(real_context[:, None, :], context, torch.full_like(context, special))
    sep = torch.full((B, K, 1), context_id, dtype=context.dtype, device=device)
    if target is None:
        target = torch.full((B, K, n_target), special, dtype=context.dtype, device=device)
    frames = torch.cat([context, sep, target.to(context.dtype)], dim=-1)  # (B, K, F)
    n_frames = frames.shape[-1]
    grid = delay.interleave(frames, special)
    S = grid.shape[-1]

    keep = torch.ones(B, S, dtype=torch.bool, device=device)
    keep[:, 1:C + 1] = real_context  # step s in 1..C holds context frame s-1 in codebook 0
    frame = delay.frame_index(K, S, device)  # (K, S)
    is_target = (frame > C) & (frame < n_frames)
    target_mask = is_target.expand(B, K, S)
    return StageSequence(grid=grid, keep=keep, known=~target_mask, target=target_mask, n_context=C)


def generation_rows(context: torch.Tensor, context_lengths: torch.Tensor, n_target: int, special: int,
                    context_id: int, guidance: bool, given: torch.Tensor | None = None):
    """Grid, known tokens and keep mask for generate_tokens, in generate.guidance_batch's row layout:
    with guidance, the unconditional rows drop the context (blanked and removed from attention) but
    keep the separator. given (B, K, n_target): target
    frames known in advance (a continuation, or the overlap with a song's previous window), the
    special token where a frame is to be sampled; both halves get them. Returns (grid, known, keep, C)."""
    def rows(drop):
        seq = build_sequence(context, given, n_target, special, context_id, context_lengths, drop)
        # a real code is never the special id, so a target token that is not special was given
        return seq.grid, seq.known | (seq.target & (seq.grid != special)), seq.keep, seq.n_context

    *conditional, C = rows(None)
    unconditional = rows(torch.ones(context.shape[0], dtype=torch.bool, device=context.device))[:3] if guidance else None
    return (*guidance_batch(tuple(conditional), unconditional), C)


# ---- the training loss: target frames only ------------------------------------------------------
def valid_steps(target: torch.Tensor) -> torch.Tensor:
    """The target mask without the last k frames of codebook k: the original's keep_only_valid_steps,
    which cuts the delayed sequence where the last frame of codebook 0 is, so that those tokens are
    never predicted. target (B, K, S) over a grid of S = frames + K steps."""
    B, K, S = target.shape
    frame = delay.frame_index(K, S, target.device)
    k = torch.arange(K, device=target.device)[:, None]
    return target & (frame < (S - K) - k)


def target_loss(logits: torch.Tensor, grid: torch.Tensor, target: torch.Tensor, valid_only: bool = True,
                first: int = 0) -> torch.Tensor:
    """Cross-entropy on target-frame tokens only (valid steps only, by default), averaged per
    codebook, then over codebooks. logits[:, :, s-1-first] predict grid[:, :, s]: logits may start at
    step `first` (the LM's first_logit), all earlier steps being context."""
    B, K, S = grid.shape
    mask = (valid_steps(target) if valid_only else target)[:, :, first + 1:]
    lg = logits[:, :, :-1][mask].float()  # (N, card)
    y = grid[:, :, first + 1:][mask]
    k = torch.arange(K, device=grid.device)[None, :, None].expand(B, K, S - 1 - first)[mask]
    ce = F.cross_entropy(lg, y, reduction="none")
    per_k = torch.zeros(K, device=ce.device).index_add(0, k, ce) / torch.bincount(k, minlength=K).clamp(min=1)
    return per_k.mean()


def first_target_logit(target: torch.Tensor) -> int:
    """The step whose logits predict the first target token: every row's context ends at the same
    step (contexts are right-aligned), so no logits are needed before it."""
    steps = target.any(1).any(0).nonzero()
    return max(int(steps[0]) - 1, 0) if len(steps) else 0


class StageLoss(nn.Module):
    """The LM with its loss, as one module, so that DistributedDataParallel sees the text
    projection and the decoder used in one forward. Logits are made for target steps only: a STAGE
    window is half context, whose logits no loss reads (half the output-head work and logits memory)."""

    def __init__(self, lm: MusicGenLM, valid_only: bool = True):
        super().__init__()
        self.lm, self.valid_only = lm, valid_only

    def forward(self, grid, keep, target, states, mask):
        text = self.lm.project_text(states, mask)
        first = first_target_logit(target)
        logits = self.lm(grid, text, mask, keep, first_logit=first)
        return target_loss(logits, grid, target, self.valid_only, first)
