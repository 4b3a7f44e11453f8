"""STAGE's prefix: [context frames][separator frame][target frames], interleaved once as a whole.

The context and the target cover the same time span: target frame t plays with context frame t.
Contexts of different lengths are left-padded to a common length; padded frames, and the whole
context of a row whose context is dropped, hold the special token and their steps are removed
from attention (`keep`), so such a row sees exactly what a row with a shorter (or no) context sees.

Which steps are removed: step s holds frame s-1-k of codebook k. Steps 1..C put a context frame
in codebook 0; those of padded or dropped frames go. Later steps mix frames (codebook 0 may hold
the separator while codebook 3 still holds a context frame); they stay, and any padded or dropped
frame in them is the special token, which is also what the delay gap holds without a context.
"""
from dataclasses import dataclass

import torch

from . import delay


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
    """Grid, known tokens and keep mask for generate_tokens. With guidance, the conditional rows are
    followed by unconditional ones that drop the context (blanked and removed from attention) but
    keep the separator; their text is dropped by generate_tokens. given (B, K, n_target): target
    frames known in advance (a continuation, or the overlap with a song's previous window), the
    special token where a frame is to be sampled; both halves get them. Returns (grid, known, keep, C)."""
    def rows(drop):
        seq = build_sequence(context, given, n_target, special, context_id, context_lengths, drop)
        # a real code is never the special id, so a target token that is not special was given
        return seq.grid, seq.known | (seq.target & (seq.grid != special)), seq.keep, seq.n_context

    grid, known, keep, C = rows(None)
    if not guidance:
        return grid, known, keep, C
    null_grid, null_known, null_keep, _ = rows(torch.ones(context.shape[0], dtype=torch.bool, device=context.device))
    return torch.cat([grid, null_grid]), torch.cat([known, null_known]), torch.cat([keep, null_keep]), C
