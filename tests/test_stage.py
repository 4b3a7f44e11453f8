"""STAGE's prefix, masks and guidance rows, the click track, and audio reading."""
import numpy as np
import pytest
import soundfile as sf
import torch

from stage_min.io import metronome
from stage_min.io.audio import AudioError, load_audio, peak_normalize
from stage_min.model import LMConfig, MusicGenLM
from stage_min.stage import build_sequence, generation_rows

P, X = 2048, 2049  # special (start / gap) and context separator


def test_prefix_grid_by_hand():
    # K=4, 3 context frames, 2 target frames: codebook k holds 10k + t for context, 100 + 10k + t for target
    context = torch.tensor([[[10 * k + t for t in range(3)] for k in range(4)]])
    target = torch.tensor([[[100 + 10 * k + t for t in range(2)] for k in range(4)]])
    seq = build_sequence(context, target, 2, P, X)
    expected = [
        [P, 0, 1, 2, X, 100, 101, P, P, P],
        [P, P, 10, 11, 12, X, 110, 111, P, P],
        [P, P, P, 20, 21, 22, X, 120, 121, P],
        [P, P, P, P, 30, 31, 32, X, 130, 131],
    ]
    assert seq.grid[0].tolist() == expected
    is_target = (seq.grid[0] >= 100) & (seq.grid[0] < P)
    assert torch.equal(seq.target[0], is_target)  # the loss goes to target frames only
    assert torch.equal(seq.known[0], ~is_target)
    assert seq.keep.all() and seq.n_context == 3


def test_padded_and_dropped_context_blank_tokens_and_remove_steps():
    context = torch.randint(0, 2048, (3, 4, 3))
    seq = build_sequence(context, None, 2, P, X, context_lengths=torch.tensor([3, 1, 3]), drop_context=torch.tensor([False, False, True]))
    assert seq.keep.tolist() == [[True] * 10, [True, False, False] + [True] * 7, [True, False, False, False] + [True] * 6]
    assert (seq.grid[1, 0, 1:3] == P).all() and seq.grid[1, 0, 3] == context[1, 0, 2]
    no_context_tokens = seq.grid[2][(seq.grid[2] != P) & (seq.grid[2] != X)]
    assert len(no_context_tokens) == 0  # target is None: only special and separator tokens remain


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = MusicGenLM(LMConfig(dim=64, n_layers=2, n_heads=4, n_special=2, text_dim=16)).eval()
    for table in model.embed:  # a non-trivial special row, so that blanking is not accidentally invisible
        torch.nn.init.normal_(table.weight)
    return model


def text_for(lm, B):
    g = torch.Generator().manual_seed(1)
    return lm.project_text(torch.randn(B, 5, 16, generator=g), torch.ones(B, 5, dtype=torch.bool)), torch.ones(B, 5, dtype=torch.bool)


@torch.no_grad()
def test_dropped_context_gives_the_logits_of_no_context(lm):
    target = torch.randint(0, 2048, (1, 4, 6))
    context = torch.randint(0, 2048, (1, 4, 5))
    text, mask = text_for(lm, 1)
    dropped = build_sequence(context, target, 6, P, X, drop_context=torch.tensor([True]))
    none = build_sequence(context[:, :, :0], target, 6, P, X)
    got = lm(dropped.grid, text, mask, dropped.keep)[:, :, dropped.keep[0]]
    expected = lm(none.grid, text, mask)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5
    # and the context does matter when it is kept
    kept = build_sequence(context, target, 6, P, X)
    with_context = lm(kept.grid, text, mask, kept.keep)[:, :, kept.target[0, 0].nonzero()[:, 0] - 1]
    assert (with_context - expected[:, :, none.target[0, 0].nonzero()[:, 0] - 1]).abs().max() > 1e-3


@torch.no_grad()
def test_batched_contexts_of_different_lengths_match_one_by_one(lm):
    target = torch.randint(0, 2048, (2, 4, 4))
    context = torch.randint(0, 2048, (2, 4, 5))
    text, mask = text_for(lm, 2)
    batch = build_sequence(context, target, 4, P, X, context_lengths=torch.tensor([5, 2]))
    logits = lm(batch.grid, text, mask, batch.keep)
    for b, length in enumerate([5, 2]):
        alone = build_sequence(context[b:b + 1, :, 5 - length:], target[b:b + 1], 4, P, X)
        expected = lm(alone.grid, text[b:b + 1], mask[b:b + 1])
        got = logits[b:b + 1][:, :, batch.keep[b]]
        assert (got - expected).abs().max() <= 1e-5


def test_guidance_rows_drop_text_and_context_but_keep_the_separator():
    context = torch.randint(0, 2048, (2, 4, 3))
    grid, known, keep, C = generation_rows(context, torch.tensor([3, 2]), 5, P, X, guidance=True)
    assert grid.shape == (4, 4, 3 + 1 + 5 + 4) and C == 3
    cond, null = grid[:2], grid[2:]
    assert torch.equal(cond[0, 0, 1:4], context[0, 0])  # conditional rows see the context
    assert not keep[2:, 1:C + 1].any() and keep[:2, 1:C + 1].sum() == 5  # null rows: context steps removed
    assert ((null == P) | (null == X)).all()  # null rows: no context token survives anywhere
    assert ((null == X).sum(-1) == 1).all() and ((cond == X).sum(-1) == 1).all()  # the separator stays
    assert torch.equal(known[:2], known[2:])
    grid1, _, keep1, _ = generation_rows(context, torch.tensor([3, 2]), 5, P, X, guidance=False)
    assert torch.equal(grid1, cond) and torch.equal(keep1, keep[:2])


@pytest.mark.parametrize("bpm,offset,per_bar", [(100.0, 0.25, 3), (137.0, 0.0, 4)])
def test_click_track_is_the_originals(bpm, offset, per_bar):
    """STAGE's clicks (docs/original.md#data): librosa.clicks at 1 kHz on every beat, again on the
    downbeats, the sum clipped to [-1, 1]; compared sample for sample with librosa's own output."""
    import librosa

    sr, seconds = 32000, 4.0
    audio = metronome.metronome(bpm, seconds, beats_per_bar=per_bar, offset=offset, sample_rate=sr)
    beats = offset + 60 / bpm * np.arange(int(np.ceil((seconds - offset) * bpm / 60)))
    assert beats[-1] < seconds <= beats[-1] + 60 / bpm
    n = int(seconds * sr)
    every = librosa.clicks(times=beats, sr=sr, click_freq=1000, length=n)
    down = librosa.clicks(times=beats[::per_bar], sr=sr, click_freq=1000, length=n)
    np.testing.assert_array_equal(audio, np.clip(every + down, -1, 1).astype(np.float32))
    first = int(beats[0] * sr)
    assert audio[first - 1] == 0 if first else True
    head = lambda i: np.sqrt(np.mean(audio[int(beats[i] * sr):int(beats[i] * sr) + sr // 100] ** 2))
    assert head(0) > 1.4 * head(1)  # a downbeat is louder than the beat after it
    with pytest.raises(ValueError, match="BPM must be"):
        metronome.metronome(0, 1.0)


def test_load_audio_resamples_and_mixes_to_mono(tmp_path):
    sr = 44100
    t = np.arange(sr) / sr
    left, right = 0.5 * np.sin(2 * np.pi * 1000 * t), 0.1 * np.sin(2 * np.pi * 1000 * t)
    sf.write(tmp_path / "stereo.flac", np.stack([left, right], 1), sr)
    audio = load_audio(tmp_path / "stereo.flac", 32000)
    assert audio.dtype == np.float32 and audio.shape == (32000,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins over one second: the tone stays at 1 kHz
    assert abs(np.abs(audio[2000:-2000]).max() - 0.3) < 0.01  # the mean of the two channels


def test_load_audio_rejects_bad_files(tmp_path):
    (tmp_path / "text.wav").write_text("hello")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1)), 32000)
    sf.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], dtype=np.float32), 32000, subtype="FLOAT")
    for name, message in [("missing.wav", "no such file"), ("text.wav", "cannot read audio"), ("empty.wav", "no samples"), ("nan.wav", "NaN")]:
        with pytest.raises(AudioError, match=message):
            load_audio(tmp_path / name, 32000)


def test_peak_normalize_only_scales_down():
    quiet = np.array([0.1, -0.2], dtype=np.float32)
    assert np.array_equal(peak_normalize(quiet), quiet)
    loud = np.array([2.0, -4.0], dtype=np.float32)
    assert np.allclose(peak_normalize(loud), [0.495, -0.99])


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    from stage_min.io.audio import save_audio
    from stage_min.io.loading import write_atomic

    umask = os.umask(0o022)
    try:
        save_audio(tmp_path / "x.wav", np.zeros(320, dtype=np.float32), 32000)
        write_atomic(tmp_path / "c.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(umask)
    for name in ("x.wav", "c.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
