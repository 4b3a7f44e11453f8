"""sample.py in STAGE mode: accompaniment and click tracks end to end, and every bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
from stage_min.io.pretrained import from_pretrained  # noqa: E402


def song(path, seconds=0.6, sr=44100, channels=2):
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.3 * np.sin(2 * np.pi * 110 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    sf.write(path, np.stack([tone] * channels, 1), sr)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_accompaniment_end_to_end(stage_run, tmp_path):
    ctx = song(tmp_path / "song.wav", seconds=0.6)
    r = run_cli("--model", stage_run, "--context", ctx, "--prompt", "funky drums", "--out", tmp_path / "drums.wav",
                "--mix-out", tmp_path / "mix.wav", "--seed", 0)
    assert r.returncode == 0, r.stderr
    stem, mix = sf.info(str(tmp_path / "drums.wav")), sf.info(str(tmp_path / "mix.wav"))
    assert stem.samplerate == 32000 and stem.channels == 1
    assert stem.frames == 30 * 640  # 0.6 s of context: 30 frames of 20 ms
    assert mix.frames == stem.frames
    stem_audio, mix_audio = sf.read(str(tmp_path / "drums.wav"))[0], sf.read(str(tmp_path / "mix.wav"))[0]
    assert np.abs(stem_audio).max() > 0 and not np.allclose(stem_audio, mix_audio, atol=1e-3)  # the mix has the song in it
    assert "warning" not in r.stderr


def test_click_track_end_to_end(stage_run, tmp_path):
    r = run_cli("--model", stage_run, "--bpm", 120, "--beats-per-bar", 3, "--duration", 0.5, "--prompt", "rock drums",
                "--out", tmp_path / "drums.wav", "--mix-out", tmp_path / "mix.wav")
    assert r.returncode == 0, r.stderr
    assert sf.info(str(tmp_path / "drums.wav")).frames == 25 * 640
    mix = sf.read(str(tmp_path / "mix.wav"))[0]
    assert len(mix) == 25 * 640 and np.abs(mix).max() > 0.1  # clicks are in the mix


def test_plain_musicgen_with_context_warns_and_long_context_is_accompanied_whole(tiny_hf, tmp_path):
    ctx = song(tmp_path / "long.wav", seconds=15.5, sr=32000, channels=1)
    r = run_cli("--model", tiny_hf[0], "--context", ctx, "--out", tmp_path / "x.wav", "--top-k", 1, "--cfg", 1,
                "--window", 5, "--overlap", 1)
    assert r.returncode == 0, r.stderr
    assert "not a STAGE model" in r.stderr
    assert "kept its first" not in r.stderr  # longer than one window: windowed, not cut
    assert sf.info(str(tmp_path / "x.wav")).frames == 15.5 * 32000


def bad_files(tmp_path):
    (tmp_path / "text.wav").write_text("not audio")
    good = song(tmp_path / "good.wav")
    data = good.read_bytes()
    (tmp_path / "corrupt.wav").write_bytes(data[:12] + b"\x00" * 40)
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1)), 32000)
    sf.write(tmp_path / "nan.wav", np.full(32000, np.nan, dtype=np.float32), 32000, subtype="FLOAT")
    sf.write(tmp_path / "silent.wav", np.zeros(32000), 32000)
    sf.write(tmp_path / "short.wav", 0.5 * np.ones(100), 32000)
    return good


CASES = [
    (["--context", "{d}/missing.wav"], "no such file"),
    (["--context", "{d}/text.wav"], "cannot read audio"),
    (["--context", "{d}/corrupt.wav"], "cannot read audio"),
    (["--context", "{d}/empty.wav"], "no samples"),
    (["--context", "{d}/nan.wav"], "NaN"),
    (["--context", "{d}/silent.wav"], "silent"),
    (["--context", "{d}/short.wav"], "too short"),
    (["--context", "{d}/good.wav", "--out", "{d}/nowhere/x.wav"], "does not exist"),
    (["--context", "{d}/good.wav", "--mix-out", "{d}/nowhere/mix.wav"], "does not exist"),
    (["--context", "{d}/good.wav", "--temperature", "0"], "temperature must be > 0"),
    (["--context", "{d}/good.wav", "--temperature", "-1"], "temperature must be > 0"),
    (["--context", "{d}/good.wav", "--top-k", "-5"], "top-k must be >= 0"),
    (["--context", "{d}/good.wav", "--top-p", "1.2"], "top-p must be in [0, 1]"),
    (["--context", "{d}/good.wav", "--top-p", "-0.1"], "top-p must be in [0, 1]"),
    (["--context", "{d}/good.wav", "--duration", "0"], "--duration must be > 0"),
    (["--context", "{d}/good.wav", "--duration", "-2"], "--duration must be > 0"),
    (["--bpm", "0", "--duration", "2"], "--bpm must be > 0"),
    (["--bpm", "-90", "--duration", "2"], "--bpm must be > 0"),
    (["--bpm", "120"], "--bpm needs --duration"),
    (["--bpm", "120", "--duration", "2", "--context", "{d}/good.wav"], "not both"),
    (["--bpm", "120", "--duration", "2", "--beats-per-bar", "0"], "--beats-per-bar must be >= 1"),
    (["--bpm", "nan", "--duration", "2"], "--bpm must be > 0"),
    (["--context", "{d}/good.wav", "--duration", "40"], "--duration at most"),
    (["--context", "{d}/good.wav", "--top-k", "many"], "invalid int value"),
    (["--context", "{d}/good.wav", "--device", "gpu"], "--device must be cpu, cuda"),
    pytest.param(["--context", "{d}/good.wav", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
]


@pytest.mark.parametrize("args, message", CASES)
def test_bad_input_one_line_exit_2_no_output(stage_run, tmp_path, capsys, args, message):
    bad_files(tmp_path)
    argv = ["--model", str(stage_run), "--out", str(tmp_path / "x.wav")] + [a.format(d=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_:
        sample.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.wav").exists() and not (tmp_path / "mix.wav").exists()


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--bpm", "120", "--duration", "1", "--out", str(tmp_path / "ro" / "x.wav")])
    assert exit_.value.code == 2 and "not writable" in capsys.readouterr().err


def test_bad_input_as_a_user_sees_it(tmp_path):
    """One real subprocess: the message is one line and there is no traceback."""
    bad_files(tmp_path)
    r = run_cli("--context", tmp_path / "nan.wav", "--out", tmp_path / "x.wav")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nan.wav'}: the audio contains NaN or infinite samples"]


@torch.no_grad()
@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_text_only_generation_with_a_stage_model_has_the_separator(stage_run, tiny_hf, monkeypatch, guidance):
    """As the original builds it for context=None (docs/original.md#sequence): frames [separator][target],
    interleaved, in both guidance halves; no context frames. A plain MusicGen keeps its own grid."""
    from stage_min import delay, pipeline
    from stage_min.generate import SamplingConfig

    seen = []
    real = pipeline.generate_tokens

    def spy(lm, grid, known, *a, **kw):
        out = real(lm, grid, known, *a, **kw)
        seen.append((grid.clone(), known.clone(), kw.get("keep"), out))
        return out

    monkeypatch.setattr(pipeline, "generate_tokens", spy)
    K, n, P, X = 4, 6, 2048, 2049
    sampling = SamplingConfig(cfg_coef=guidance)
    rows = 2 if guidance != 1.0 else 1
    model = from_pretrained(str(stage_run))
    _, codes = model.generate(["funky drums"], n, sampling, seed=0)
    grid, known, keep, out = seen[-1]
    expected = torch.full((K, 1 + n + K), P)  # start step, then the separator staggered by the delay
    for k in range(K):
        expected[k, 1 + k] = X
    frame = delay.frame_index(K, 1 + n + K)
    target = (frame >= 1) & (frame <= n)  # frame 0 is the separator
    assert grid.shape == (rows, K, 1 + n + K)
    assert torch.equal(known, (~target).expand(rows, K, -1))
    assert torch.equal(grid[:, ~target], expected[~target].expand(rows, -1))  # both halves hold the separator
    assert keep is not None and keep.all()  # nothing to mask but the start step (the model's own rule)
    assert out.shape == (1, K, 1 + n + K) and torch.equal(out[:, ~target], expected[None, ~target])
    assert (out[:, target] < P).all()
    assert torch.equal(codes, delay.deinterleave(out)[:, :, 1:]) and codes.shape == (1, K, n)

    plain = from_pretrained(str(tiny_hf[0]))
    _, codes = plain.generate(["funky drums"], n, sampling, seed=0)
    grid, known, keep, out = seen[-1]
    assert grid.shape == (rows, K, n + K) and not (grid == X).any() and not (out == X).any() and keep is None


def test_mix_out_is_level_matched(tmp_path):
    """--mix-out is io.audio.mix of the click track and the stem (each part at one loudness, then a
    limiter), not their raw sum in which a loud stem buried the clicks."""
    from stage_min.io.audio import loudness_db, mix
    from stage_min.io.metronome import metronome

    if not (ROOT / "weights" / "stage-toy" / "model.safetensors").exists():
        pytest.skip("needs the shipped toy model in weights/stage-toy")
    stem_path, mix_path = tmp_path / "drums.wav", tmp_path / "mix.wav"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--bpm", "120", "--duration", "2", "--seed", "0",
                        "--out", str(stem_path), "--mix-out", str(mix_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    stem, written = sf.read(stem_path, dtype="float32")[0], sf.read(mix_path, dtype="float32")[0]
    expected = mix(metronome(120, 2.0), {"stem": stem}, 32000)
    assert len(written) == len(stem) and np.abs(written - expected).max() < 2e-4  # 16-bit files
    click_part = mix(metronome(120, 2.0), {}, 32000)
    assert abs(loudness_db(click_part, 32000) - loudness_db(expected - click_part, 32000)) < 6  # both heard
