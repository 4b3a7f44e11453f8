"""MusicGen's delay interleaving of K codebooks.

Frames c[k, t] (K codebooks, T frames) become S = T + K steps: at step s, codebook k holds frame
s - 1 - k, or the special token where that frame does not exist. Step 0 is the all-special start
step. Logits at step s predict step s + 1.
"""
import torch


def frame_index(n_codebooks: int, n_steps: int, device=None) -> torch.Tensor:
    """(K, S) frame index held by each (codebook, step): s - 1 - k (out of range where negative)."""
    steps = torch.arange(n_steps, device=device)
    return steps[None, :] - 1 - torch.arange(n_codebooks, device=device)[:, None]


def interleave(codes: torch.Tensor, special: int) -> torch.Tensor:
    """(B, K, T) frames -> (B, K, T + K) steps."""
    B, K, T = codes.shape
    idx = frame_index(K, T + K, codes.device)
    valid = (idx >= 0) & (idx < T)
    gathered = codes.gather(2, idx.clamp(0, T - 1).expand(B, K, T + K)) if T else codes.new_zeros(B, K, K)
    return torch.where(valid, gathered, torch.full_like(gathered, special))


def deinterleave(steps: torch.Tensor, n_frames: int | None = None) -> torch.Tensor:
    """(B, K, S, ...) steps -> (B, K, S - K, ...) frames (works on ids and on logits alike)."""
    K, S = steps.shape[1], steps.shape[2]
    T = S - K if n_frames is None else n_frames
    return torch.stack([steps[:, k, k + 1:k + 1 + T] for k in range(K)], dim=1)


def valid_mask(n_codebooks: int, n_frames: int, device=None) -> torch.Tensor:
    """(K, T + K) bool: where the pattern holds a real frame (not start or gap)."""
    idx = frame_index(n_codebooks, n_frames + n_codebooks, device)
    return (idx >= 0) & (idx < n_frames)


def logits_for_frames(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, S, card) of an interleaved sequence -> (B, K, S - K, card) aligned with frames:
    the logit predicting frame t of codebook k sits at step t + k (it predicts step t + k + 1)."""
    K, S = logits.shape[1], logits.shape[2]
    T = S - K
    return torch.stack([logits[:, k, k:k + T] for k in range(logits.shape[1])], dim=1)
