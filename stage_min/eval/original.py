"""The original STAGE decoder and its sampling loop, rebuilt on x-transformers 1.26.0 for comparison only.

Used by the tests (the reference that official checkpoints are checked against) and by
`bench.py --mode stage` (the baseline our cached sampler is timed against); stage_min's own model
never imports it. Needs `pip install x-transformers==1.26.0` (in the `.[test]` extra).

What the STAGE code does, in its terms (docs/original.md):
- the decoder is an x-transformers `TransformerWrapper` over a pre-norm `Decoder` with cross-attention,
  64-dim heads, no feed-forward biases, one embedding table per codebook (summed, the special row a
  zero padding row), sinusoidal positions counted from the first step that holds a real token, and one
  output head per codebook;
- generation has no KV cache: at every sampling step the whole sequence so far (context, separator,
  the stem sampled up to now; conditional and unconditional rows) goes through the decoder again, and
  the next token is drawn from the guided logits of the last step (guidance 3, top-k 250).
"""
import torch
import torch.nn as nn

from ..generate import SamplingConfig, guided, sample


class ResidualTokens(nn.Module):
    """Sum of one embedding per codebook; the special token's row is padding (zero, no gradient)."""

    def __init__(self, dim, rows, n_q, padding):
        super().__init__()
        self.emb = nn.ModuleList([nn.Embedding(rows, dim, padding_idx=padding) for _ in range(n_q)])

    def forward(self, x):
        return sum(e(x[:, k]) for k, e in enumerate(self.emb))


class StagePositions(nn.Module):
    """cos | sin halves, frequency step 1 / (half - 1), at the given (B, T, 1) positions."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x, pos=None, seq_start_pos=None):
        half = self.dim // 2
        phase = pos.float() / (10000.0 ** (torch.arange(half, device=pos.device).float().view(1, 1, -1) / (half - 1)))
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class ResidualHeads(nn.Module):
    def __init__(self, dim, card, n_q):
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(dim, card, bias=False) for _ in range(n_q)])

    def forward(self, x):
        return torch.stack([head(x) for head in self.linears], dim=1)


def build_decoder(dim=128, depth=2, card=2048, n_q=4, max_seq_len=4096, seed=0, random_norms=True):
    """The decoder as the STAGE code builds it (MusicGen-small's settings at its defaults; smaller here)
    with random weights. random_norms: norm weights drawn around 1 (not the trivial init), so that a
    swapped norm shows up in a comparison."""
    import x_transformers as xt

    torch.manual_seed(seed)
    decoder = xt.TransformerWrapper(
        num_tokens=card + 2, max_seq_len=max_seq_len, use_abs_pos_emb=True, scaled_sinu_pos_emb=True,
        attn_layers=xt.Decoder(dim=dim, depth=depth, heads=dim // 64, attn_dim_head=64, attn_flash=True,
                               ff_no_bias=True, cross_attend=True),
    )
    decoder.token_emb = ResidualTokens(dim, card + 2, n_q, padding=card)
    decoder.pos_emb = StagePositions(dim)
    decoder.to_logits = ResidualHeads(dim, card, n_q)
    with torch.no_grad():
        if random_norms:
            for name, p in decoder.named_parameters():
                if "attn_layers" in name and p.dim() == 1:
                    p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
        for e in decoder.token_emb.emb:
            e.weight[card] = 0  # what padding_idx and STAGE's loader leave in the checkpoint
    return decoder.eval()


def logits(decoder, grid, text, text_mask, special=2048):
    """Logits (B, K, S, card) and the step mask (B, S), as STAGE's MusicgenLm.forward computes them: a step exists when any
    codebook holds a real token; positions count from the first such step; rows without text get one
    zero vector (the null condition)."""
    attention_mask = (grid != special).any(1)
    first = attention_mask.long().argmax(-1, keepdim=True)
    steps = torch.arange(grid.shape[-1], device=grid.device)[None]
    positions = torch.where(steps >= first, steps - first, torch.zeros_like(steps))[..., None]
    empty = ~text_mask.any(-1)
    text = torch.where(empty[:, None, None], torch.zeros_like(text), text)
    text_mask = text_mask | empty[:, None]
    return decoder(grid, mask=attention_mask, pos=positions, context=text, context_mask=text_mask), attention_mask


@torch.no_grad()
def generate(decoder, grid, known, text, text_mask, sc: SamplingConfig, special=2048, first=None, last=None,
             generator=None):
    """The original's loop: for each unknown step s, the decoder re-runs on grid[..., :s] (all rows) and
    the guided logits of its last step are sampled. grid/known (2B, K, S) as generation_rows builds
    them (conditional rows, then unconditional ones); text (B, L, dim) projected, the unconditional rows
    get none. first/last: only steps [first, last) (a timing sample); returns the grid's B rows."""
    R, B = grid.shape[0], text.shape[0]
    grid = grid.clone()
    text = torch.cat([text, torch.zeros_like(text)]) if R == 2 * B else text
    text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)]) if R == 2 * B else text_mask
    unknown = (~known).any(1).any(0).nonzero()
    first = int(unknown[0]) if first is None else first
    for s in range(first, grid.shape[-1] if last is None else last):
        out, _ = logits(decoder, grid[:, :, :s], text, text_mask, special)
        next_ids = sample(guided(out[:, :, -1], B, sc.cfg_coef), sc, generator).repeat(R // B, 1)
        grid[:, :, s] = torch.where(known[:, :, s], grid[:, :, s], next_ids)
    return grid[:B]
