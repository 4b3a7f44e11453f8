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


def test_genres_and_moods_build_the_stage_caption(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import sample
    from stage_min.cli import sample_job
    from stage_min.train.captions import stage_caption

    assert stage_caption("rock, indie", "energetic") == "Genres: rock, indie. Mood: energetic. "
    assert stage_caption(" Rock ,Alternative Rock,, Pop Rock", " happy,love ") == \
        "Genres: Rock, Alternative Rock, Pop Rock. Moods: happy, love. "  # the form of the shipped example captions
    assert stage_caption(moods="energetic, happy") == "Moods: energetic, happy. "  # one part alone, as an example has it
    assert stage_caption(genres="Pop") == "Genre: Pop. "  # one item: the singular, as the original's captions
    assert stage_caption("a, b, c, d", "x") == "Genres: a, b, c. Mood: x. "  # at most 3 items, as in training
    assert stage_caption() == ""
    args = sample.parse_args(["--genres", "rock, indie", "--moods", "energetic", "--out", str(tmp_path / "x.wav")])
    sample_job.check_options(args)
    assert args.prompt == "Genres: rock, indie. Mood: energetic. "
    assert "caption: 'Genres: rock, indie. Mood: energetic. '" in capsys.readouterr().err
    # every mode takes it: a stack of stems, a folder of songs
    import numpy as np
    import soundfile as sf

    (tmp_path / "songs").mkdir()
    sf.write(str(tmp_path / "songs" / "a.wav"), np.full(3200, 0.1, np.float32), 32000)
    for mode in (["--context", str(tmp_path / "songs" / "a.wav"), "--stems", "drums,bass", "--model", "drums=d",
                  "--model", "bass=b", "--out", str(tmp_path / "y.wav")],
                 ["--context", str(tmp_path / "songs"), "--out", str(tmp_path / "out")]):
        args = sample.parse_args(["--moods", "happy", *mode])
        sample_job.check_options(args)
        assert args.prompt == "Mood: happy. "


@pytest.mark.parametrize("args, message", [
    (["--prompt", "funky", "--genres", "rock"], "not both"),
    (["--prompt", "funky", "--moods", "happy"], "not both"),
    (["--genres", " , "], "--genres has no item"),
    (["--moods", ""], "--moods has no item"),
])
def test_bad_caption_options_fail_with_one_line(tiny_hf, tmp_path, args, message):
    r = run_sample("--model", tiny_hf[0], "--out", tmp_path / "x.wav", "--duration", 1, *args)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
