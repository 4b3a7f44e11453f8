"""Bad inputs through the real command lines (issue 12): each one ends in one line on stderr and
exit code 2 (130 for Ctrl-C), writes nothing, leaves its inputs as they were and runs no code from
a data file. Most cases call the scripts' main(argv) in the test process (options are checked
before any model is loaded, so they cost milliseconds); a real process only where one is needed:
a FIFO, Ctrl-C, kill -9, and torch's warnings on a pickle refusal."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from stage_min.io import convert
from stage_min.toy import synth, tiny
from stage_min.train import training as T
from stage_min.io.loading import save_native

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
from stage_min.cli import sample_job  # noqa: E402
import train  # noqa: E402

NO_MODEL = "/no/such/model"  # options are checked before the model: an error about it means a check came too late


class Evil:
    """Pickles into a call that leaves a marker file: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def digest(folder: Path) -> dict:
    """Every readable regular file's content hash (a FIFO or a locked file is skipped)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and os.access(p, os.R_OK):
            out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def one_line_exit_2(call, argv, capsys, code=2, after_progress=False) -> str:
    """Run a main(argv); it must exit with `code` after exactly one line on stderr (after_progress:
    the error is the last line, after the progress lines of a run that got going); returns the line."""
    with pytest.raises(SystemExit) as e:
        result = call(argv)
        raise SystemExit(result)  # convert.main returns its exit code
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code, err
    assert err and err[-1].startswith("error:") and (after_progress or len(err) == 1), err
    assert "Traceback" not in "".join(err)
    return err[-1]


# ---- inputs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_hf):
    """Audio files and model folders, good and bad, made once."""
    d = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    sf.write(d / "good.wav", 0.3 * rng.standard_normal((44100, 2)).astype(np.float32), 44100)
    sf.write(d / "long.wav", 0.3 * rng.standard_normal(32000 * 20).astype(np.float32), 32000)
    sf.write(d / "huge.wav", np.full(44100, 3.4e38, dtype=np.float32), 44100, subtype="FLOAT")  # finite, NaN once resampled
    sf.write(d / "639.wav", 0.5 * np.ones(639, dtype=np.float32), 32000)
    os.mkfifo(d / "fifo.wav")
    os.symlink(d / "loop_b.wav", d / "loop_a.wav")
    os.symlink(d / "loop_a.wav", d / "loop_b.wav")
    shutil.copy(d / "good.wav", d / "locked.wav")
    os.chmod(d / "locked.wav", 0)

    base = Path(tiny_hf[0])

    def model(name, edit_config=None, edit_files=None):
        folder = d / name
        shutil.copytree(base, folder)
        if edit_config is not None:
            (folder / "config.json").write_text(edit_config(json.loads((folder / "config.json").read_text())))
        if edit_files is not None:
            edit_files(folder)
        return folder

    def set_(section, key, value):
        def edit(c):
            c[section][key] = value
            return json.dumps(c)
        return edit

    model("config_list", lambda c: "[]")
    model("config_null", lambda c: "null")
    model("config_deep", lambda c: "[" * 100000 + "]" * 100000)
    model("config_utf8", edit_files=lambda f: (f / "config.json").write_bytes(b'{"decoder": "\xff\xfe"}'))
    model("config_folder", edit_files=lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()))
    model("zero_heads", set_("decoder", "num_attention_heads", 0))
    model("codec_rate_0", set_("audio_encoder", "sampling_rate", 0))
    model("bad_spiece", edit_files=lambda f: (f / "spiece.model").write_bytes(b"\x00garbage" * 10))
    model("spiece_fifo", edit_files=lambda f: ((f / "spiece.model").unlink(), os.mkfifo(f / "spiece.model")))

    lm_cfg = dict(dim=64, n_layers=2, n_heads=4, n_codebooks=4, card=2048, n_special=2, text_dim=32)
    from stage_min.model import LMConfig, MusicGenLM

    lm = MusicGenLM(LMConfig(**lm_cfg))
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    state["heads.0.weight"][0, 0] = float("nan")
    save_native(d / "nan_weights", state, lm.cfg, str(base))
    save_native(d / "base_gone", lm.state_dict(), lm.cfg, str(d / "deleted_base"))
    save_native(d / "string_dim", lm.state_dict(), lm.cfg, str(base))
    config = json.loads((d / "string_dim" / "config.json").read_text())
    config["lm"]["dim"] = "64"
    (d / "string_dim" / "config.json").write_text(json.dumps(config))

    def native(name, edit):  # a native model folder whose config.json `edit` changes (issue 23's bad configs)
        save_native(d / name, lm.state_dict(), lm.cfg, str(base))
        config = json.loads((d / name / "config.json").read_text())
        (d / name / "config.json").write_text(edit(config) or json.dumps(config))

    native("layers_1e9", lambda c: c["lm"].update(n_layers=10**9))  # a hang building 1e9 layers
    native("dim_1e9", lambda c: c["lm"].update(dim=10**9, ffn_dim=0))  # a memory blow-up
    from stage_min.io.formats import export_native
    from stage_min.io.pretrained import from_pretrained

    export_native(from_pretrained(str(base), stage=True), d / "window_1e309")  # self-contained: its config is the one read
    config = json.loads((d / "window_1e309" / "config.json").read_text())
    (d / "window_1e309" / "config.json").write_text(json.dumps(config)[:-1] + ', "window_seconds": 1e309}')  # json reads inf
    native("config_dev_zero", lambda c: None)
    (d / "config_dev_zero" / "config.json").unlink()
    (d / "config_dev_zero" / "config.json").symlink_to("/dev/zero")  # sample.py once grew to 10 GB reading it
    ruined = {k: v.clone() for k, v in lm.state_dict().items()}
    ruined["heads.0.weight"][0, 0] = 1e30  # finite, but what a diverging run (--lr 1e30) saves
    save_native(d / "ruined_weights", ruined, lm.cfg, str(base))
    save_native(d / "int64_weights", {k: (v * 100).long() if v.is_floating_point() else v for k, v in lm.state_dict().items()},
                lm.cfg, str(base))
    return d


# ---- sample.py -----------------------------------------------------------------------------------
CTX = ["--context", "{d}/good.wav"]
CLICK = ["--bpm", "120", "--duration", "2"]
SAMPLE_CASES = [
    # non-finite and out-of-range numbers
    (["--cfg", "inf"], "guidance coefficient"),
    (["--cfg", "nan"], "guidance coefficient"),
    (["--temperature", "inf"], "temperature must be > 0"),
    (["--temperature", "nan"], "temperature must be > 0"),
    (["--top-p", "nan"], "top-p must be in [0, 1]"),
    (["--duration", "nan"], "--duration must be > 0"),
    ([*CTX, "--duration", "inf"], "--duration must be > 0"),
    (["--bpm", "120", "--duration", "inf"], "--duration must be > 0"),
    (["--bpm", "inf", "--duration", "2"], "--bpm must be > 0"),
    (["--bpm", "1e9", "--duration", "2"], "--bpm must be > 0 and at most"),
    ([*CLICK, "--offset", "inf"], "--offset must be a finite number"),
    ([*CLICK, "--offset", "nan"], "--offset must be a finite number"),
    ([*CLICK, "--offset", "2"], "not before the end of the click track"),
    (["--bpm", "120", "--duration", "0.01"], "one codec frame"),  # before the model, not after
    (["--bpm", "120", "--duration", "1e9"], "--duration at most 3600 s with --bpm"),  # whole click tracks, not endless ones
    (["--seed", str(10**23)], "--seed must be in [0, 2^63 - 1]"),
    (["--seed", "-1"], "--seed must be in"),
    (["--device", "meta"], "--device must be cpu, cuda"),
    (["--device", "mps"], "--device must be cpu, cuda"),
    (["--device", "xpu"], "--device must be cpu, cuda"),
    # output formats: a short list, both paths checked before any work
    (["--out", "{d}/x.wve"], "cannot write .wve"),
    (["--out", "{d}/x.xi"], "cannot write .xi"),
    (["--out", "{d}/x.htk"], "cannot write .htk"),
    (["--out", "{d}/x.sd2"], "cannot write .sd2"),
    (["--out", "{d}/x.raw"], "cannot write .raw"),
    (["--out", "{d}/x"], "without a suffix"),
    ([*CLICK, "--mix-out", "{d}/m.raw"], "cannot write .raw"),
    # no overwritten inputs
    ([*CLICK, "--mix-out", "{d}/x.wav"], "the same file"),
    ([*CTX, "--out", "{d}/good.wav"], "is the --context file"),
    ([*CTX, "--mix-out", "{d}/good.wav"], "is the --context file"),
    ([*CTX, "--mix-out", "{d}/../{n}/good.wav"], "is the --context file"),  # another spelling of the same path
    # context files
    (["--context", "{d}/fifo.wav"], "not a regular file"),
    (["--context", "{d}/loop_a.wav"], "symbolic links"),
    (["--context", "{d}"], "is a folder"),
    (["--context", "{d}/huge.wav"], "NaN or infinite samples once"),
]
MODEL_CASES = [  # these need the model: a tiny one, so each costs about a second
    ("{d}/639.wav", "{d}/config_list", "639 samples"),  # the context is read before the model: its error first
    ("{d}/good.wav", "{d}/config_list", "holds list, not a JSON object"),
    ("{d}/good.wav", "{d}/config_null", "holds null"),
    ("{d}/good.wav", "{d}/config_deep", "nested too deeply"),
    ("{d}/good.wav", "{d}/config_utf8", "config_utf8/config.json is not UTF-8"),
    ("{d}/good.wav", "{d}/config_folder", "config.json is a folder"),
    ("{d}/good.wav", "{d}/zero_heads", "n_heads=0"),
    ("{d}/good.wav", "{d}/codec_rate_0", "sampling_rate=0"),
    ("{d}/good.wav", "{d}/bad_spiece", "not a sentencepiece model"),
    ("{d}/good.wav", "{d}/string_dim", "dim='64'"),
    ("{d}/good.wav", "{d}/nan_weights", "NaN or infinite values"),
    ("{d}/good.wav", "{d}/base_gone", "no longer exists"),
    # issue 23: hangs and memory blow-ups, refused before anything is built or read
    ("{d}/good.wav", "{d}/layers_1e9", "n_layers=1000000000 is above the limit of 256"),
    ("{d}/good.wav", "{d}/dim_1e9", "dim=1000000000 is above the limit of 16384"),
    ("{d}/good.wav", "{d}/config_dev_zero", "config.json is not a regular file"),
    ("{d}/good.wav", "{d}/window_1e309", "'window_seconds' must be a number of seconds in (0, 30], got inf"),
    ("{d}/good.wav", "{d}/int64_weights", "wrong number type for"),
    ("{d}/good.wav", "{d}/spiece_fifo", "spiece.model is not a regular file"),  # sentencepiece would block on it
    ("{d}/good.wav", "{d}/ruined_weights", "reaches |w| = 1e+30"),
]


def run_sample(inputs, capsys, argv):
    before = digest(inputs)
    fmt = {"d": inputs, "n": inputs.name}
    model = [] if "--model" in argv else ["--model", NO_MODEL]  # --model is repeatable (--stems): not overridden
    argv = [*model, "--out", str(inputs / "x.wav"), "--duration", "1"] + [a.format(**fmt) for a in argv]
    line = one_line_exit_2(sample.main, argv, capsys)
    assert digest(inputs) == before  # nothing written, nothing overwritten
    return line


@pytest.mark.parametrize("argv, message", SAMPLE_CASES)
def test_sample_bad_options(inputs, capsys, argv, message):
    line = run_sample(inputs, capsys, argv)
    assert message in line


@pytest.mark.parametrize("context, model, message", MODEL_CASES)
def test_sample_bad_models(inputs, capsys, context, model, message):
    line = run_sample(inputs, capsys, ["--context", context, "--model", model, "--duration", "0.1"])
    assert message in line


def test_sample_unreadable_context(inputs, capsys, monkeypatch):
    from stage_min.io import audio

    if os.access(inputs / "locked.wav", os.R_OK):  # root reads any file: make the open fail as it would for a user
        def locked_open(path, *a, **kw):
            if Path(path).name == "locked.wav":
                raise PermissionError(13, "Permission denied", str(path))
            return open(path, *a, **kw)

        monkeypatch.setattr(audio, "open", locked_open, raising=False)
    line = run_sample(inputs, capsys, ["--context", "{d}/locked.wav"])
    assert line == f"error: {inputs / 'locked.wav'}: cannot open it (Permission denied)"


def test_sample_overwrite_replaces_the_context_only_when_asked(inputs, tiny_hf, tmp_path, capsys):
    song = tmp_path / "song.wav"
    shutil.copy(inputs / "good.wav", song)
    sample.main(["--model", str(tiny_hf[0]), "--context", str(song), "--out", str(song), "--overwrite",
                 "--duration", "0.2", "--top-k", "1", "--cfg", "1"])
    assert sf.info(str(song)).samplerate == 32000 and sf.info(str(song)).frames == 10 * 640  # the stem now


def test_tiny_temperature_is_greedy_not_nan():
    from stage_min.generate import SamplingConfig, sample as draw

    logits = torch.randn(2, 4, 2048, generator=torch.Generator().manual_seed(0))
    for temperature in (1e-45, 1e-300):
        assert torch.equal(draw(logits, SamplingConfig(top_k=0, temperature=temperature)), logits.argmax(-1))
    half = logits.half() * 100  # fp16 logits and a large guidance: computed in fp32, no overflow
    from stage_min.generate import guided

    assert torch.isfinite(guided(torch.cat([half, -half]), 2, 1e4)).all()


def test_config_that_is_dev_zero_does_not_hang_a_real_process(inputs):
    """A hang test, under a timeout: sample.py once read /dev/zero until it held 10 GB."""
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(inputs / "config_dev_zero"), "--duration",
                        "1", "--out", str(inputs / "x.wav")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "config.json is not a regular file" in lines[0], r.stderr
    assert not (inputs / "x.wav").exists()


def full_disk(limit_bytes: int):
    """For a child process: files may grow to limit_bytes, then writes fail with EFBIG as on a full disk
    (SIGXFSZ ignored, so the write returns an error rather than killing the process)."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_sample_on_a_full_disk_says_so_in_one_line(tiny_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.wav").write_bytes(b"an earlier output")
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_hf[0]), "--duration", "0.5",
                        "--out", str(out / "kept.wav"), "--overwrite"], capture_output=True, text=True, timeout=300,
                       preexec_fn=full_disk(4096), env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: ") and "is the disk full?" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and "LibsndfileError" not in r.stderr
    assert (out / "kept.wav").read_bytes() == b"an earlier output"  # nothing already written is lost
    assert sorted(p.name for p in out.iterdir()) == ["kept.wav"]  # no temporary left


def test_only_the_used_part_of_a_long_context_is_read(inputs):
    args = sample.parse_args(["--context", str(inputs / "long.wav"), "--out", "x.wav", "--duration", "1"])
    audio, total_frames = sample_job.read_context(args)
    assert total_frames == 20 * 50  # the whole file's length, from its header
    assert len(audio) <= 32000 * 1.1  # but only about the 1 s needed was read
    n_frames, kept = sample_job.plan_frames(args, audio, total_frames)
    assert (n_frames, kept) == (50, 50)


def test_fifo_context_does_not_block_a_real_process(inputs):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--context", str(inputs / "fifo.wav"), "--out",
                        str(inputs / "x.wav"), "--model", NO_MODEL], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {inputs / 'fifo.wav'}: not a regular file "
                                                                    "(a FIFO, socket or device); give an audio file"]


def test_ctrl_c_always_stops_sampling(tiny_hf, tmp_path):
    """SIGINT while torch is imported and while sampling: exit 130, one line, nothing written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for when in ("start", "sampling"):
        out = tmp_path / f"{when}.wav"
        p = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_hf[0]), "--duration", "30",
                              "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
        if when == "sampling":  # wait for the progress bar: the model is loaded, the loop runs
            seen = ""
            while "sampling" not in seen:
                ch = p.stderr.read(1)
                assert ch, seen
                seen += ch
        else:
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        err = p.stderr.read()
        assert p.wait(timeout=120) == 130, err
        assert err.strip().splitlines()[-1].endswith("error: interrupted") and "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(".*"))


# ---- train.py ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synth.write_dataset(tmp_path_factory.mktemp("bad_train") / "data", n_songs=4, seconds=1.5, seed=1)


def train_args(tiny_hf, dataset, out, *extra, steps=1):
    return ["--data", str(dataset), "--target", "drums", "--preset", "tiny", "--base", str(tiny_hf[0]), "--out", str(out),
            "--dim", "32", "--layers", "1", "--heads", "2", "--target-seconds", "0.5", "--context-min", "0.2",
            "--context-max", "0.4", "--batch-size", "2", "--eval-windows", "2", "--max-steps", str(steps),
            "--val-fraction", "0.25", "--p-metronome", "0", *extra]


TRAIN_CASES = [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--clip", "inf"], "--clip must be a finite number"),
    (["--beta2", "nan"], "--beta2 must be a finite number"),
    (["--seed", "-1"], "--seed must be in"),
    (["--seed", str(10**23)], "--seed must be in"),
    (["--target-seconds", "inf"], "--target-seconds must be a finite number"),
    (["--context-step", "inf"], "--context-step must be a finite number"),
    (["--silence", "nan"], "--silence must be a finite number"),
    (["--device", "mps"], "--device must be cpu, cuda"),
    (["--device", "meta"], "--device must be cpu, cuda"),
    (["--val-fraction", "0.99"], "holds out all 4 songs"),  # not a complaint about the stem length
    (["--base", "{d}/config_folder"], "config.json is a folder"),
    (["--base", "{d}/config_list"], "holds list"),
    (["--base", "{d}/zero_heads"], "n_heads=0"),
]


@pytest.mark.parametrize("extra, message", TRAIN_CASES)
def test_train_bad_options(inputs, tiny_hf, dataset, tmp_path, capsys, extra, message):
    argv = train_args(tiny_hf, dataset, tmp_path / "run", *[e.format(d=inputs) for e in extra])
    line = one_line_exit_2(train.main, argv, capsys)
    assert message in line
    assert not (tmp_path / "run" / "latest").exists()


def test_train_run_config_that_is_a_folder(tiny_hf, dataset, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "step-00000001" / "config.json").mkdir(parents=True)
    (run / "latest").write_text("step-00000001\n")
    (run / "step-00000001" / T.STATE_FILE).write_bytes(b"")
    assert "config.json is a folder" in one_line_exit_2(train.main, train_args(tiny_hf, dataset, run, "--resume"), capsys)


def test_pickled_train_state_is_refused_in_one_line_without_running_code(tiny_hf, dataset, tmp_path):
    """A real process: torch's warnings about the pickle would show up on its stderr."""
    run = tmp_path / "run"
    train.main(train_args(tiny_hf, dataset, run))
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "evil": Evil(marker)}, T.latest_checkpoint(run) / T.STATE_FILE, _use_new_zipfile_serialization=False)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *train_args(tiny_hf, dataset, run, "--resume")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and not marker.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused: it pickles Python objects" in lines[0], lines


def test_pickled_cache_file_is_not_run(tiny_hf, dataset, tmp_path):
    cache = tmp_path / "cache"
    train.main(train_args(tiny_hf, dataset, tmp_path / "a", "--cache-dir", str(cache)))
    marker = tmp_path / "pwned"
    files = sorted(cache.glob("*.pt"))
    assert files
    for f in files:
        torch.save({"evil": Evil(marker)}, f)
    train.main(train_args(tiny_hf, dataset, tmp_path / "b", "--cache-dir", str(cache)))  # recomputes the cache
    assert not marker.exists()
    assert all(isinstance(torch.load(f, weights_only=True), dict) for f in files)  # safe files again


def test_non_finite_loss_stops_without_saving_over_the_last_checkpoint(tiny_hf, dataset, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    train.main(train_args(tiny_hf, dataset, run, "--save-every", "1", steps=1))
    good = digest(run / "step-00000001")
    from stage_min import stage

    real = stage.target_loss
    monkeypatch.setattr(stage, "target_loss", lambda *a: real(*a) * float("nan"))
    line = one_line_exit_2(train.main, train_args(tiny_hf, dataset, run, "--resume", "--save-every", "1", steps=3), capsys,
                           after_progress=True)
    assert "is not finite; stopped without saving" in line
    assert (run / "latest").read_text().strip() == "step-00000001" and digest(run / "step-00000001") == good


def test_a_diverging_run_keeps_the_last_good_checkpoint(tiny_hf, dataset, tmp_path, capsys):
    """--lr 1e30 gives finite but ruined weights (1e30) after one update: they are not saved, the good
    step stays, and the message says which one is kept."""
    run = tmp_path / "run"
    train.main(train_args(tiny_hf, dataset, run, "--save-every", "1", steps=1))
    good = digest(run / "step-00000001")
    line = one_line_exit_2(train.main, train_args(tiny_hf, dataset, run, "--resume", "--lr", "1e30", "--save-every", "1",
                                                  steps=3), capsys, after_progress=True)
    assert "not saved: the last good checkpoint step-00000001 in" in line and "is kept" in line, line
    assert (run / "latest").read_text().strip() == "step-00000001" and digest(run / "step-00000001") == good
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("step-", ".step-"))) == ["step-00000001"]
    from stage_min.io.pretrained import from_pretrained

    assert from_pretrained(str(run)).lm.cfg.dim == 32  # what sample.py --model RUN loads: the good one


def test_checkpoint_problem_names_ruined_weights_and_exploding_losses(lm_and_optimizer):
    lm, _, _ = lm_and_optimizer
    state = lm.state_dict()
    assert T.checkpoint_problem(state, 7.0, 2048) is None
    assert "is exploding" in T.checkpoint_problem(state, 1e6, 2048)
    assert "the training loss is nan" in T.checkpoint_problem(state, float("nan"), 2048)
    ruined = {**state, "heads.0.weight": state["heads.0.weight"] * 1e30}
    assert "reaches |w|" in T.checkpoint_problem(ruined, 7.0, 2048)
    broken = {**state, "heads.0.weight": state["heads.0.weight"] * float("inf")}
    assert "NaN or infinite" in T.checkpoint_problem(broken, None, 2048)


def test_save_checkpoint_refuses_an_exploding_loss_and_keeps_the_good_one(tiny_hf, tmp_path, lm_and_optimizer):
    lm, cfg, optimizer = lm_and_optimizer
    run = tmp_path / "run"
    run.mkdir()
    T.save_checkpoint(run, lm, str(tiny_hf[0]), 1, cfg, optimizer, loss=7.5)
    good = digest(run / "step-00000001")
    with pytest.raises(T.Diverged, match="exploding.*the last good checkpoint step-00000001 in .* is kept"):
        T.save_checkpoint(run, lm, str(tiny_hf[0]), 2, cfg, optimizer, loss=1e9)
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-00000001"] and digest(run / "step-00000001") == good


def test_train_on_a_full_disk_keeps_the_last_checkpoint(tiny_hf, dataset, tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: train.py says so in one line (SaveError is an
    OSError), the last checkpoint stays whole and no temporary folder is left."""
    run = tmp_path / "run"
    train.main(train_args(tiny_hf, dataset, run, "--save-every", "1", steps=1))
    good = digest(run / "step-00000001")

    def full(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")

    monkeypatch.setattr(T.torch, "save", full)
    line = one_line_exit_2(train.main, train_args(tiny_hf, dataset, run, "--resume", "--save-every", "1", steps=2), capsys,
                           after_progress=True)
    assert "cannot save the checkpoint of step 2" in line and "is the disk full?" in line and "step-00000001" in line
    assert sorted(p.name for p in run.iterdir() if p.name != T.METRICS_FILE) == ["latest", "step-00000001"]
    assert digest(run / "step-00000001") == good


def test_save_checkpoint_on_a_real_full_disk(tiny_hf, tmp_path):
    """The same with a real limit on file size in a child process (EFBIG, as ENOSPC on a full disk)."""
    run = tmp_path / "run"
    script = f"""
import sys, torch
from stage_min.model import LMConfig, MusicGenLM
from stage_min.train import training as T
lm = MusicGenLM(LMConfig(dim=32, n_layers=1, n_heads=2, n_codebooks=4, card=2048, n_special=2, text_dim=32))
cfg = T.TrainConfig(preset="tiny", lr=1e-3)
opt = T.make_optimizer(lm, cfg)
run = {str(run)!r}
if sys.argv[1] == "first":
    import pathlib; pathlib.Path(run).mkdir()
    T.save_checkpoint(run, lm, {str(tiny_hf[0])!r}, 1, cfg, opt)
else:
    try:
        T.save_checkpoint(run, lm, {str(tiny_hf[0])!r}, 2, cfg, opt)
    except T.SaveError as e:
        print(e)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, "first"], check=True, env=env, timeout=300)
    good = digest(run)
    r = subprocess.run([sys.executable, "-c", script, "second"], capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=full_disk(64 << 10))
    assert r.returncode == 0 and "cannot save the checkpoint of step 2" in r.stdout, (r.stdout, r.stderr)
    assert "the last good checkpoint step-00000001" in r.stdout and digest(run) == good
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-00000001"]


def test_a_run_folder_is_locked_against_a_second_train_py(tmp_path):
    """Two train.py on one --out once corrupted each other (the second's clean-up deleted the first's
    temporary step): the second now stops at once. The lock is the kernel's: it goes with the process."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom stage_min.train import training as T\n"
                               f"lock = T.lock_run({str(run)!r})\nprint('locked', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(T.UsageError, match="is in use by another train.py"):
            T.lock_run(run)
    finally:
        holder.kill()
        holder.wait()
    with T.lock_run(run):  # released with the process (kill -9 included)
        with pytest.raises(T.UsageError, match="in use"):
            T.lock_run(run)  # a second lock, even in one process
    T.lock_run(run).release()
    assert list(run.iterdir()) == []  # no lock file left behind


def test_train_py_takes_the_lock_and_refuses_out_inside_data(tiny_hf, dataset, tmp_path, capsys):
    """The same two rules through train.py itself: nothing is written into a locked or a dataset folder."""
    run = tmp_path / "run"
    with T.lock_run(run):
        line = one_line_exit_2(train.main, train_args(tiny_hf, dataset, run), capsys)
        assert "in use by another train.py" in line and list(run.iterdir()) == []
    before = sorted(p.name for p in dataset.iterdir())
    line = one_line_exit_2(train.main, train_args(tiny_hf, dataset, dataset / "runs"), capsys)
    assert "inside --data" in line and sorted(p.name for p in dataset.iterdir()) == before


def test_out_inside_data_is_refused(dataset, tmp_path):
    for out in (dataset, dataset / "runs" / "drums", dataset / "." ):
        with pytest.raises(T.UsageError, match="--out .* (is --data itself|inside --data)"):
            T.check_out_not_data(out, dataset)
    T.check_out_not_data(tmp_path / "run", dataset)  # beside it: fine
    T.check_out_not_data(dataset.parent, dataset)  # a run folder above the data never lands among the songs


def test_unusable_held_out_songs_say_validation_is_off(tiny_hf, dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    for song in sorted(data.iterdir()):  # every song but one too short for a window: whichever is held out
        if song.name != "song_000":
            for stem in song.glob("*.wav"):
                sf.write(stem, np.zeros(3200, dtype=np.float32) + 0.1, 32000)
    argv = train_args(tiny_hf, data, tmp_path / "run", "--val-fraction", "0.5", "--seed", "2")
    from stage_min.train import data as D

    train_songs, _ = D.split_songs(D.find_songs(data), 0.5, 2)
    assert "song_000" in [s.name for s in train_songs]  # the seed puts the one long song in training
    train.main(argv)
    assert "warning: validation is off" in capsys.readouterr().err


# ---- checkpoints: one unit, whatever the moment of a failure --------------------------------------
class Fault(Exception):
    pass


@pytest.fixture()
def lm_and_optimizer():
    from stage_min.model import LMConfig, MusicGenLM

    torch.manual_seed(0)
    lm = MusicGenLM(LMConfig(dim=32, n_layers=1, n_heads=2, n_codebooks=4, card=2048, n_special=2, text_dim=32))
    cfg = T.TrainConfig(preset="tiny", lr=1e-3)
    return lm, cfg, T.make_optimizer(lm, cfg)


def test_a_save_that_fails_at_any_file_boundary_keeps_the_previous_checkpoint(tiny_hf, tmp_path, monkeypatch, lm_and_optimizer):
    """Make each file operation of a save fail in turn (torch.save, each file written, each fsync,
    the rename, the pointer, the clean-up): the previous checkpoint stays complete and resumable."""
    lm, cfg, optimizer = lm_and_optimizer
    from stage_min.io import loading
    from stage_min.io.pretrained import from_pretrained

    boundaries = [(T.torch, "save"), (loading, "write_atomic"), (T, "_fsync"), (T.os, "rename"), (T, "write_atomic"),
                  (T, "remove_stale")]
    count = {"n": 0, "fail_at": None}

    def counting(real):
        def call(*a, **kw):
            count["n"] += 1
            if count["n"] == count["fail_at"]:
                raise Fault(f"boundary {count['n']}")
            return real(*a, **kw)
        return call

    for module, name in boundaries:
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    run = tmp_path / "run"
    run.mkdir()
    T.save_checkpoint(run, lm, str(tiny_hf[0]), 1, cfg, optimizer)
    n_calls = count["n"]
    assert n_calls >= 8  # torch.save, 2 files, 3 fsyncs, rename, pointer (+ clean-up)
    step1 = digest(run / "step-00000001")
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(1.0)
    for fail_at in range(1, n_calls + 1):
        count["n"], count["fail_at"] = 0, fail_at
        with pytest.raises(Fault):
            T.save_checkpoint(run, lm, str(tiny_hf[0]), 2, cfg, optimizer)
        count["fail_at"] = None
        latest = T.latest_checkpoint(run)
        state = T.check_resumable(run, cfg)  # complete and consistent, whichever it is
        if latest.name == "step-00000001":
            assert digest(latest) == step1, fail_at
        else:  # the failure came after the pointer switch: the new checkpoint is complete
            assert state["step"] == 2 and fail_at >= n_calls - 1, fail_at
            (run / "latest").write_text("step-00000001\n")  # back to step 1 for the next boundary
        T.remove_stale(run)  # what the next start does
        assert sorted(p.name for p in run.iterdir()) == ["latest", "step-00000001"], fail_at
    model = from_pretrained(str(run))  # sample.py --model RUN follows the pointer
    assert model.lm.cfg.dim == 32


def test_kill_9_during_saves_leaves_a_resumable_run(tiny_hf, dataset, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                          *train_args(tiny_hf, dataset, run, "--save-every", "1", "--eval-every", "1000", steps=100000)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while not (run / "latest").exists():  # saves every step from here on
            assert p.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        p.kill()
        p.wait()
    step = T.check_resumable(run, T.TrainConfig(preset="tiny", dim=32, layers=1, heads=2, seed=0,
                                                 data_cfg=train.D.DataConfig(target="drums", val_fraction=0.25)))["step"]
    train.main(train_args(tiny_hf, dataset, run, "--resume", "--save-every", "1", steps=step + 1))
    assert "done: step" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["latest", T.METRICS_FILE, f"step-{step + 1:08d}"]  # leftovers gone


# ---- evaluate.py ---------------------------------------------------------------------------------
EVAL_CASES = [
    (["beats", "{d}/good.wav", "--bpm", "1e12"], "--bpm must be > 0 and at most 1000"),  # numpy asked for 497 GiB
    (["beats", "{d}/good.wav", "--bpm", "120", "--offset", "1e12"], "--offset 1e+12 s is not before the end"),  # was f_measure null
    (["beats", "{d}/good.wav", "--beats", "{d}"], "is a folder"),
    (["beats", "{d}/good.wav", "--beats", "{d}/fifo.wav"], "is not a regular file"),
    (["tempo", "--model", NO_MODEL, "--bpm", "1e12", "--out", "{d}/eval"], "every tempo must be > 0 and at most 1000"),
]


@pytest.mark.parametrize("argv, message", EVAL_CASES)
def test_evaluate_bad_options(inputs, capsys, argv, message):
    import evaluate

    before = digest(inputs)
    line = one_line_exit_2(evaluate.main, [a.format(d=inputs) for a in argv], capsys)
    assert message in line, line
    assert digest(inputs) == before


def test_evaluate_beats_dev_zero_does_not_hang_a_real_process(inputs):
    """A hang test, under a timeout: --beats /dev/zero was read until memory ran out."""
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "beats", str(inputs / "good.wav"), "--beats", "/dev/zero"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --beats: /dev/zero is not a regular file (a device, FIFO or socket); refusing to read it"], r.stderr


# ---- convert, synth, tiny -------------------------------------------------------------------------
def test_convert_bad_sources(inputs, tmp_path, capsys):
    stage = tmp_path / "stage.safetensors"
    from safetensors.torch import save_file

    save_file({"lm.decoder.token_emb.emb.0.weight": torch.zeros(64, 64)}, str(stage))
    (tmp_path / "truncated.pt").write_bytes(stage.read_bytes()[:-100])
    ac = tmp_path / "audiocraft"
    ac.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"best_state": {"x": Evil(marker)}}, ac / "state_dict.bin")
    for src, message in [(inputs / "config_utf8", "is not UTF-8"), (inputs / "zero_heads", "n_heads=0"),
                         (tmp_path / "truncated.pt", "damaged safetensors file (truncated?)"),
                         (ac, "refused: it pickles Python objects")]:
        line = one_line_exit_2(convert.main, [str(src), str(tmp_path / "out")], capsys)
        assert message in line, (src, line)
        assert not (tmp_path / "out").exists()
    assert not marker.exists()


def test_synth_bad_options(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    existing = tmp_path / "data"
    synth.write_dataset(existing, 1, seconds=0.5)
    before = digest(existing)
    for argv, message in [([str(tmp_path / "a"), "--seconds", "inf"], "--seconds must be > 0 and at most"),
                          ([str(tmp_path / "a"), "--seconds", "1e9"], "--seconds must be > 0 and at most"),
                          ([str(tmp_path / "a"), "--seconds", "nan"], "--seconds must be > 0 and at most"),
                          ([str(tmp_path / "a"), "--songs", "0"], "--songs must be in"),
                          ([str(tmp_path / "file")], "is a file"),
                          ([str(existing), "--songs", "1"], "is not empty")]:
        assert message in one_line_exit_2(synth.main, argv, capsys)
    assert not (tmp_path / "a").exists() and digest(existing) == before
    synth.main([str(existing), "--songs", "1", "--seconds", "0.5", "--seed", "5", "--overwrite"])
    assert digest(existing) != before


def test_tiny_hear_with_a_corrupt_wav_leaves_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "song").mkdir(parents=True)
    (data / "song" / "drums.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    line = one_line_exit_2(tiny.main, [str(tmp_path / "model"), "--hear", str(data)], capsys)
    assert "drums.wav" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no half-built model folder, no temporary
    assert "not a folder" in one_line_exit_2(tiny.main, [str(tmp_path / "m"), "--hear", str(tmp_path / "none")], capsys)
