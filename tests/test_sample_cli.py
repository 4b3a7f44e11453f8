"""sample.py as a user runs it: a subprocess on a tiny random checkpoint."""
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def run_sample(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_text_to_music_writes_one_second_wav(tiny_hf, tmp_path):
    out = tmp_path / "x.wav"
    r = run_sample("--model", tiny_hf[0], "--prompt", "funky drums", "--duration", 1, "--out", out, "--seed", 0)
    assert r.returncode == 0, r.stderr
    info = sf.info(str(out))
    assert info.samplerate == 32000 and info.frames == 32000 and info.channels == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]  # no temporary file left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "0"], "temperature must be > 0"),
        (["--top-k", "-1"], "top-k must be >= 0"),
        (["--top-p", "1.5"], "top-p must be in [0, 1]"),
        (["--duration", "0"], "--duration must be > 0"),
        (["--model", "/no/such/folder"], "model folder /no/such/folder not found"),
        (["--out", "/no/such/dir/x.wav"], "does not exist"),
    ],
)
def test_bad_options_fail_with_one_line(tiny_hf, tmp_path, args, message):
    base = {"--model": str(tiny_hf[0]), "--out": str(tmp_path / "x.wav"), "--duration": "1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = run_sample(*[x for kv in base.items() for x in kv])
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "x.wav").exists()
