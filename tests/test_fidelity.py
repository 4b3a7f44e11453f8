"""The original's inference on a whole context (MusicGen.accompany(..., whole_context=True), sample.py --whole-context) and its fp16 encoding
(DataConfig.encode_precision): docs/original.md#inference and #training."""
import numpy as np
import pytest
import torch

from stage_min.cli import sample_job
from stage_min.io.pretrained import from_pretrained
from stage_min.train import data as D


@pytest.fixture(scope="module")
def toy():
    return from_pretrained("weights/stage-toy")


def test_whole_context_conditions_one_stem_on_all_of_it(toy, monkeypatch):
    from stage_min.generate import SamplingConfig

    rng = np.random.default_rng(0)
    sr, hop = toy.codec.sample_rate, toy.codec.hop
    long, short = (rng.standard_normal(int(s * sr)).astype(np.float32) * 0.1 for s in (6.0, 1.5))
    seen = {}

    def spy(context, lengths, prompts, n_frames, *args):  # generation itself is pipeline's, tested elsewhere
        seen.update(context=context.clone(), lengths=lengths.clone(), n_frames=n_frames)
        return torch.zeros(len(prompts), 1, n_frames * hop), torch.zeros(len(prompts), toy.lm.cfg.n_codebooks, n_frames, dtype=torch.long)

    monkeypatch.setattr(toy, "_stage_rows", spy)
    audio, codes = toy.accompany([long, short], ["", ""], n_frames=6, sampling=SamplingConfig(top_k=5), seed=0, whole_context=True)
    assert codes.shape == (2, toy.lm.cfg.n_codebooks, 6) and audio.shape[0] == 2
    n_long, n_short = len(long) // hop, len(short) // hop
    assert seen["lengths"].tolist() == [n_long, n_short] and seen["n_frames"] == 6  # nothing cut
    assert torch.equal(seen["context"][0], toy.encode_context(torch.from_numpy(long))[0])  # encoded whole, alone
    assert torch.equal(seen["context"][1, :, -n_short:], toy.encode_context(torch.from_numpy(short))[0])
    assert (seen["context"][1, :, :-n_short] == toy.lm.cfg.special_id).all()  # left-padded


def test_context_cut_notice():
    assert sample_job.context_cut_notice(500, 500, 500, 50.0) is None
    note = sample_job.context_cut_notice(1500, 250, 250, 50.0)
    assert note.startswith("note: the context is 30.00 s; kept its first 5.00 s for a 5.00 s stem") and "\n" not in note


def test_fp16_encoding_as_the_original(toy):
    assert D.DataConfig().encode_precision == "fp32"
    with pytest.raises(ValueError, match="encode-precision"):
        D.DataConfig(encode_precision="bf16").check()
    from stage_min.train.training import encode_targets

    rng = np.random.default_rng(1)
    x = [rng.standard_normal(toy.codec.sample_rate).astype(np.float32) * 0.1 for _ in range(2)]
    a = encode_targets(toy.codec, x, "cpu")
    with D.encode_autocast("cpu", "fp16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
        b = encode_targets(toy.codec, x, "cpu")
    assert a.shape == b.shape and (a == b).float().mean() > 0.8  # mostly the same codes, not all (docs/training.md)


def test_sample_whole_context_keeps_all_of_a_long_context(tmp_path):
    """sample.py --whole-context: one --duration stem over the whole 6 s context (the toy's window is 2 s);
    without it the same --duration cuts the context and says so; it goes with one --context file only."""
    import subprocess
    import sys

    import soundfile as sf

    from stage_min.io.metronome import metronome

    song = tmp_path / "song.wav"
    sf.write(song, metronome(bpm=100, duration=6.0), 32000)
    run = lambda *a: subprocess.run([sys.executable, "sample.py", *map(str, a)], capture_output=True, text=True)  # noqa: E731
    r = run("--context", song, "--whole-context", "--duration", 1, "--out", tmp_path / "w.wav", "--seed", 0)
    assert r.returncode == 0, r.stderr
    assert sf.info(str(tmp_path / "w.wav")).frames == 32000 and "kept its first" not in r.stderr
    r = run("--context", song, "--duration", 1, "--out", tmp_path / "cut.wav", "--seed", 0)
    assert r.returncode == 0 and "note: the context is 6.00 s; kept its first 1.00 s" in r.stderr
    r = run("--bpm", 120, "--duration", 2, "--whole-context", "--out", tmp_path / "x.wav")
    assert r.returncode == 2 and "--whole-context makes one stem over one --context file" in r.stderr
