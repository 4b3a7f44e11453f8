"""The fast path: static-cache decoding equals the full forward, compiled equals eager, seeds reproduce."""
import os
import shutil

import pytest
import torch

from stage_min import delay, stage
from stage_min.generate import SamplingConfig, compiled_step, generate_tokens
from stage_min.model import LMConfig, MusicGenLM

K, CARD = 4, 2048


def tiny_lm(n_special=1, seed=0) -> MusicGenLM:
    torch.manual_seed(seed)
    return MusicGenLM(LMConfig(dim=64, n_layers=2, n_heads=4, text_dim=32, n_special=n_special)).eval()


def text_rows(lm, B=2, L=6, seed=1):
    """B projected texts of different lengths (row 0 shorter), then the B null rows of guidance."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor([L - 2] + [L] * (B - 1))[:, None]
    text = lm.project_text(torch.randn(B, L, lm.cfg.text_dim, generator=g), mask)
    return text, mask, torch.cat([text, torch.zeros_like(text)]), torch.cat([mask, torch.zeros_like(mask)])


def stage_rows(lm, n_target=8, seed=2):
    """Guidance rows of a STAGE prefix: cond rows with contexts of lengths 5 and 3 (left-padded), the
    uncond rows with the context dropped; real target codes so that teacher forcing is meaningful."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, CARD, (2, K, 5), generator=g)
    target = torch.randint(0, CARD, (2, K, n_target), generator=g)
    args = dict(special=lm.cfg.special_id, context_id=lm.cfg.context_id, context_lengths=torch.tensor([5, 3]))
    cond = stage.build_sequence(context, target, n_target, **args)
    uncond = stage.build_sequence(context, target, n_target, drop_context=torch.tensor([True, True]), **args)
    stack = lambda name: torch.cat([getattr(cond, name), getattr(uncond, name)])  # noqa: E731
    return stack("grid"), stack("known"), stack("keep"), cond.n_context


@torch.no_grad()
@pytest.mark.parametrize("with_prefix", [False, True])
def test_cached_decoding_matches_full_forward(with_prefix):
    lm = tiny_lm(n_special=2 if with_prefix else 1)
    _, _, text, mask = text_rows(lm)
    if with_prefix:
        grid, _, keep, C = stage_rows(lm)
        assert not keep.all() and (~keep).sum(1).tolist() == [0, 2, 5, 5]  # dropped and padded steps exist
        n_prefill = C + 2  # every dropped step is inside the prefill
    else:
        grid = torch.randint(0, CARD, (4, K, 14), generator=torch.Generator().manual_seed(3))
        keep, n_prefill = None, 3
    S = grid.shape[-1]
    full = lm(grid, text, mask, keep)  # (R, K, S, card)
    assert full.abs().max() > 0.1 and (full[:2] - full[2:]).abs().max() > 1e-3  # text and context matter

    lm.setup_cache(grid.shape[0], S, text, mask)
    cached = [lm.prefill(grid[:, :, :n_prefill], None if keep is None else keep[:, :n_prefill])]
    for s in range(n_prefill, S):
        cached.append(lm.decode_step(grid[:, :, s:s + 1], torch.tensor([s])))
    lm.clear_cache()
    cached = torch.stack(cached, dim=2)  # logits of steps n_prefill-1 .. S-1
    assert S - n_prefill >= 5  # the decode part is longer than the prefill part's tail
    assert (cached - full[:, :, n_prefill - 1:]).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("with_prefix", [False, True])
def test_top_k_1_is_greedy_on_guided_logits(with_prefix):
    """Every generated token is the argmax of the guided teacher-forced logits of the step before."""
    lm = tiny_lm(n_special=2 if with_prefix else 1)
    text, mask, _, _ = text_rows(lm)
    if with_prefix:
        grid, known, keep, _ = stage_rows(lm)
        grid = torch.where(known, grid, torch.full_like(grid, lm.cfg.special_id))  # hide the true target
    else:
        S = 12
        grid = torch.full((4, K, S), lm.cfg.special_id)
        known, keep = ~delay.valid_mask(K, S - K).expand(4, K, S), None
    sc = SamplingConfig(cfg_coef=3.0, top_k=1)
    n_prefill = int((~known).any(1).any(0).nonzero()[0])
    out = generate_tokens(lm, grid, known, text, mask, sc, keep=None if keep is None else keep[:, :n_prefill])
    R = grid.shape[0]
    filled = out.repeat(2, 1, 1)
    filled = torch.where(known, grid, filled)  # each half keeps its own given tokens
    logits = lm(filled, torch.cat([text, torch.zeros_like(text)]), torch.cat([mask, torch.zeros_like(mask)]), keep)
    cond, uncond = logits[: R // 2], logits[R // 2:]
    greedy = (uncond + (cond - uncond) * sc.cfg_coef).argmax(-1)  # guidance written out; (B, K, S): step s predicts s + 1
    generated = ~known[: R // 2, :, 1:]
    assert generated.sum() >= 16
    assert torch.equal(out[:, :, 1:][generated], greedy[:, :, :-1][generated])
    assert len(out[:, :, 1:][generated].unique()) > 4


def c_compiler():
    """torch.compile's CPU backend (inductor) builds C++: the compiler it would use, or None."""
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)


def sampling_setup():
    lm = tiny_lm()
    text, mask, _, _ = text_rows(lm)
    S = 16
    grid = torch.full((4, K, S), lm.cfg.special_id)
    known = ~delay.valid_mask(K, S - K).expand(4, K, S)
    sc = SamplingConfig(cfg_coef=3.0, top_k=250)

    def run(seed, step_fn=None):
        g = torch.Generator().manual_seed(seed)
        return generate_tokens(lm, grid, known, text, mask, sc, generator=g, step_fn=step_fn, free_cache=step_fn is None)

    return lm, known, run


@torch.no_grad()
def test_seed_reproduces():
    lm, known, run = sampling_setup()
    eager = run(0)
    assert torch.equal(eager, run(0))
    assert not torch.equal(eager, run(1))
    assert (eager[~known[:2]] < CARD).all()  # sampled codes, never the special token


@pytest.mark.skipif(c_compiler() is None, reason="torch.compile's CPU backend needs a C++ compiler (c++, g++ or clang++, or $CXX)")
@torch.no_grad()
def test_compiled_equals_eager():
    lm, known, run = sampling_setup()
    eager = run(0)
    step = compiled_step(lm)
    assert torch.equal(run(0, step), eager)  # the one compilation
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second generation reuses the graph
        assert torch.equal(run(1, step), run(1))
    lm.clear_cache()
