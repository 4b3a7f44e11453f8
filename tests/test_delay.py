import torch

from stage_min import delay

SPECIAL = 2048


def test_interleave_layout_by_hand():
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6]]])  # K=2, T=3
    S = SPECIAL
    assert delay.interleave(codes, S).tolist() == [[[S, 1, 2, 3, S], [S, S, 4, 5, 6]]]


def test_round_trip():
    codes = torch.randint(0, 2048, (3, 4, 17))
    grid = delay.interleave(codes, SPECIAL)
    assert grid.shape == (3, 4, 21)
    assert torch.equal(delay.deinterleave(grid), codes)
    valid = delay.valid_mask(4, 17)
    assert valid.sum() == 4 * 17
    assert (grid[:, ~valid] == SPECIAL).all() and (grid[:, valid] != SPECIAL).all()


def test_matches_transformers_build_delay_pattern_mask(tiny_hf):
    _, hf = tiny_hf
    B, K, T = 2, 4, 9
    codes = torch.randint(0, 2048, (B, K, T))
    with_start = torch.cat([torch.full((B, K, 1), SPECIAL), codes], dim=-1).reshape(B * K, -1)
    _, pattern = hf.decoder.build_delay_pattern_mask(with_start, pad_token_id=SPECIAL, max_length=T + K)
    # transformers shifts [start, codes] right by k per codebook and pads the rest with the special token
    ours = delay.interleave(codes, SPECIAL).reshape(B * K, -1)
    assert torch.equal(pattern, ours)


def test_logits_for_frames_aligns_with_targets():
    B, K, T = 1, 4, 6
    codes = torch.randint(0, 2048, (B, K, T))
    grid = delay.interleave(codes, SPECIAL)
    # fake logits that put all mass on the next step's token
    nxt = torch.roll(grid, -1, dims=-1)
    logits = torch.nn.functional.one_hot(nxt.clamp(max=2047), 2048).float()
    assert torch.equal(delay.logits_for_frames(logits).argmax(-1), codes)
