"""Sampling filters and guidance against expectations written here, independently of generate.py.

Each case draws many tokens from fixed logits (one call: every row of a (N, V) batch gets its own
noise, so the rows are N independent draws, seeded) and checks that
- no token outside the kept set (top-k, top-p) ever appears, and
- each token's frequency is within 5 standard errors (sqrt(p (1 - p) / N)) of its probability
  under the distribution computed below in float64 with numpy: softmax(logits / temperature), the
  k largest kept (top-k), then the smallest set of most likely tokens whose probabilities reach
  top_p (top-p, on what top-k left), renormalised.
The seeds are fixed, so the result is the same on every run; 5 standard errors keeps a correct
sampler far from the bound, while a filter that is ignored puts mass on tokens that must have none.
"""
import numpy as np
import pytest
import torch

from stage_min.generate import SamplingConfig, guided, sample

# distinct logits, no ties; cumulative probabilities stay away from the top-p values used below
LOGITS = [2.0, 1.5, 1.1, 0.7, 0.3, -0.2, -0.9, -1.6]
N = 40000


def expected(logits, temperature=1.0, top_k=0, top_p=0.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    if top_k > 0:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    if 0 < top_p < 1:
        order = np.argsort(-p)
        reach = np.cumsum(p[order])
        n_keep = int(np.searchsorted(reach, top_p)) + 1  # the first token whose cumulative sum reaches top_p stays
        p[order[n_keep:]] = 0.0
        p /= p.sum()
    return p


def frequencies(sc: SamplingConfig, logits=LOGITS, n=N, seed=0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    ids = sample(torch.tensor(logits).expand(n, len(logits)), sc, g)
    assert ids.shape == (n,)
    return np.bincount(ids.numpy(), minlength=len(logits)) / n


def check(sc: SamplingConfig, logits=LOGITS):
    p = expected(logits, sc.temperature, sc.top_k, sc.top_p)
    f = frequencies(sc, logits)
    outside = f[p == 0]
    assert (outside == 0).all(), f"tokens outside the kept set were drawn: frequencies {f.round(4)}, expected {p.round(4)}"
    tolerance = 5 * np.sqrt(p * (1 - p) / N) + 1e-9
    assert (np.abs(f - p) <= tolerance).all(), f"frequencies {f.round(4)} != expected {p.round(4)} (tolerance {tolerance.round(4)})"
    return p


@pytest.mark.parametrize("top_k", [2, 3, 5])
def test_top_k_keeps_the_k_most_likely_tokens_at_their_renormalised_odds(top_k):
    p = check(SamplingConfig(top_k=top_k, top_p=0.0, temperature=1.0))
    assert (p > 0).sum() == top_k


@pytest.mark.parametrize("top_p", [0.3, 0.55, 0.8, 0.95])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p):
    p = check(SamplingConfig(top_k=0, top_p=top_p, temperature=1.0))
    assert 1 <= (p > 0).sum() < len(LOGITS)  # each value cuts something: an ignored top-p is seen


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    check(SamplingConfig(top_k=0, top_p=0.0, temperature=temperature))


def test_no_filter_draws_from_the_softmax():
    p = check(SamplingConfig(top_k=0, top_p=0.0, temperature=1.0))
    assert (p > 0).all()
    check(SamplingConfig(top_k=0, top_p=1.0, temperature=1.0))  # top-p 1 keeps everything


def test_top_k_then_top_p_with_temperature():
    """Both filters at once: top-k first, then top-p on the renormalised rest, all after the temperature."""
    p = check(SamplingConfig(top_k=5, top_p=0.7, temperature=1.5))
    assert 1 < (p > 0).sum() < 5


def test_filters_act_on_each_row_by_itself():
    """Rows of a batch (B, K, V) with different logits: every drawn token is among the top k of its own
    row (a threshold shared across rows would let other tokens through)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, 64, generator=g) * 3
    top5 = logits.topk(5, dim=-1).indices
    seen = torch.zeros(6, 4, 64, dtype=torch.bool)
    for seed in range(200):
        ids = sample(logits, SamplingConfig(top_k=5, top_p=0.0), torch.Generator().manual_seed(seed))
        assert (ids[..., None] == top5).any(-1).all()
        seen.scatter_(-1, ids[..., None], True)
    assert seen.sum(-1).float().mean() > 3  # and more than one of the five is drawn


def test_top_k_1_and_seeds():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample(logits, SamplingConfig(top_k=1)), logits.argmax(-1))
    sc = SamplingConfig(top_k=0)
    a = sample(logits, sc, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample(logits, sc, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("cfg_coef", [1.0, 3.0, 7.5])
def test_guidance_is_uncond_plus_coef_times_cond_minus_uncond(cfg_coef):
    """Classifier-free guidance on raw logits, written out here in float64: rows [cond; uncond] ->
    uncond + cfg_coef * (cond - uncond)."""
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    want = uncond.double() + cfg_coef * (cond.double() - uncond.double())
    got = guided(torch.cat([cond, uncond]), 2, cfg_coef)
    assert got.shape == cond.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(guided(cond, 2, cfg_coef), cond)  # no unconditional rows: nothing to guide
