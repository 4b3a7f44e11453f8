"""train.py end to end on synthetic stems and a tiny random base: checkpoints, resume, Ctrl-C,
DDP equivalence, CLI errors, and the STAGE effect (the context lowers the target loss)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import build_tiny_hf
from stage_min.toy import synth, tiny
from stage_min.train import training as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base folder, dataset folder): the conftest tiny MusicGen with a codec that hears, and
    procedurally generated songs."""
    root = tmp_path_factory.mktemp("train")
    data = synth.write_dataset(root / "data", n_songs=96, seconds=4.0, seed=2)
    base = root / "base"
    base.mkdir()
    build_tiny_hf(base)
    tiny.make_codec_hear(base, sorted(data.glob("song_00[0-5]/drums.wav")) + sorted(data.glob("song_00[0-5]/bass.wav")))
    return base, data


def args(setup, out, *extra, steps=4):
    base, data = setup
    return ["--data", str(data), "--target", "drums", "--preset", "tiny", "--base", str(base), "--out", str(out),
            "--dim", "64", "--layers", "2", "--heads", "2", "--target-seconds", "1", "--context-min", "0.5",
            "--context-max", "1", "--batch-size", "4", "--eval-windows", "4", "--eval-every", "1000",
            "--lr", "1e-3", "--max-steps", str(steps), *extra]


def checkpoint(run):
    return T.latest_checkpoint(Path(run))


def lm_weights(run):
    return load_file(str(checkpoint(run) / "model.safetensors"))


def test_cooldown_steps_run_at_the_cooldown_lr(setup, tmp_path):
    """--cooldown-steps 2 of 4: steps 3 and 4 at --cooldown-lr, in the optimizer and in metrics.jsonl."""
    cfg = T.TrainConfig(max_steps=4, lr=1e-3, cooldown_steps=2, cooldown_lr=2e-4)
    assert [cfg.lr_at(step) for step in range(4)] == [1e-3, 1e-3, 2e-4, 2e-4]
    assert T.TrainConfig(max_steps=4, lr=1e-3).lr_at(3) == 1e-3  # none by default: the original's constant lr
    run = tmp_path / "run"
    train.main(args(setup, run, "--log-every", "1", "--cooldown-steps", "2", "--cooldown-lr", "2e-4", steps=4))
    records = [json.loads(line) for line in (run / T.METRICS_FILE).read_text().splitlines()]
    assert [r["lr"] for r in records if "lr" in r] == [1e-3, 1e-3, 2e-4, 2e-4]
    state = torch.load(checkpoint(run) / T.STATE_FILE, weights_only=True)
    assert all(g["lr"] == 2e-4 for g in state["optimizer"]["param_groups"])


def test_checkpoint_loads_and_resume_matches_uninterrupted(setup, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train.main(args(setup, full, steps=5))
    assert (full / "latest").read_text().strip() == "step-00000005"
    assert sorted(p.name for p in full.iterdir()) == ["latest", T.METRICS_FILE, "step-00000005"]  # older steps removed
    config = json.loads((checkpoint(full) / "config.json").read_text())
    assert config["format"] == "stage_min" and config["step"] == 5 and config["train"]["data_cfg"]["target"] == "drums"
    assert (checkpoint(full) / T.STATE_FILE).exists()
    records = [json.loads(line) for line in (full / T.METRICS_FILE).read_text().splitlines()]
    assert any("loss" in r for r in records) and any("val_loss" in r and "val_loss_nocontext" in r for r in records)
    assert not list(full.glob(".*"))  # atomic writes leave no temporary files

    from stage_min.io.pretrained import from_pretrained

    model = from_pretrained(str(full))  # what sample.py --model does
    assert model.lm.cfg.n_special == 2 and model.lm.cfg.dim == 64
    for k in range(4):  # after 5 steps at lr 1e-3 with weight decay, the special row is still exactly zero
        assert model.lm.embed[k].weight[2048].abs().max() == 0
    train_cfg = config["train"]  # the recipe's defaults, recorded with the run
    assert train_cfg["clip_mode"] == "value" and train_cfg["precision"] == "fp16" and train_cfg["decay_all"]
    assert train_cfg["data_cfg"]["augment"] and train_cfg["data_cfg"]["p_full_context"] == 0.05
    assert torch.equal(model.lm.embed[0].weight, lm_weights(full)["lm.embed.0.weight"])

    # Ctrl-C after 2 steps: a checkpoint at step 2, exit 130; resuming ends where `full` ended
    part = tmp_path / "part"
    real = T.make_batch
    calls = {"n": 0}

    def interrupting(model, examples, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1 + 3:  # 1 eval batch, then the third training step
            raise KeyboardInterrupt
        return real(model, examples, *a, **kw)

    monkeypatch.setattr(T, "make_batch", interrupting)
    with pytest.raises(SystemExit) as e:
        train.main(args(setup, part, steps=5))
    assert e.value.code == 130
    assert json.loads((checkpoint(part) / "config.json").read_text())["step"] == 2
    monkeypatch.setattr(T, "make_batch", real)
    train.main(args(setup, part, "--resume", steps=5))
    a, b = lm_weights(full), lm_weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((checkpoint(part) / "config.json").read_text())["step"] == 5


def test_sample_py_runs_on_a_run_folder(setup, tmp_path):
    run = tmp_path / "run"
    train.main(args(setup, run, "--grad-accum", "2", steps=1))  # gradient accumulation runs too
    out = tmp_path / "x.wav"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(run), "--prompt", "drums",
                        "--duration", "0.2", "--out", str(out), "--seed", "0"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert sf.info(str(out)).samplerate == 32000


def test_small_preset_starts_from_the_base_lm_with_a_context_token(setup, tmp_path):
    base, _ = setup
    run = tmp_path / "small"
    a = [x for x in args(setup, run, steps=1) if x not in ("--dim", "--layers", "--heads", "64", "2")]
    train.main([*a, "--preset", "small", "--lr", "1e-12"])  # one step that barely moves the weights
    from stage_min.io.loading import read_state_dict

    ref = read_state_dict(base)["decoder.model.decoder.embed_tokens.0.weight"]  # (2049, 64)
    emb = lm_weights(run)["lm.embed.0.weight"]
    assert emb.shape == (2050, 64)  # one row more: the context token
    assert torch.allclose(emb[:2048], ref[:2048], atol=1e-6)
    # the original's set-up (docs/original.md#model): special row zeroed (and frozen), start step masked,
    # separator row Kaiming normal: std sqrt(2 / dim), far from the mean of the code rows
    assert ref[2048].abs().max() > 0 and emb[2048].abs().max() == 0
    assert 0.5 < emb[2049].std().item() / (2 / 64) ** 0.5 < 1.5
    assert (emb[2049] - ref[:2048].mean(0)).norm() > 0.5
    lm_cfg = json.loads((checkpoint(run) / "config.json").read_text())["lm"]
    assert lm_cfg["n_special"] == 2 and lm_cfg["zero_special_row"] and not lm_cfg["attend_start_step"]
    # the options that keep MusicGen's own set-up instead
    run2 = tmp_path / "small_mean"
    a2 = [x if x != str(run) else str(run2) for x in a]
    train.main([*a2, "--preset", "small", "--lr", "1e-12", "--separator-init", "mean", "--train-special-row",
                "--attend-start-step"])
    emb = lm_weights(run2)["lm.embed.0.weight"]
    assert torch.allclose(emb[:2049], ref, atol=1e-6) and torch.allclose(emb[2049], ref[:2048].mean(0), atol=1e-6)
    lm_cfg = json.loads((checkpoint(run2) / "config.json").read_text())["lm"]
    assert not lm_cfg["zero_special_row"] and lm_cfg["attend_start_step"]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    bad = [
        (["--data", str(tmp_path / "nope")], "does not exist"),
        (["--lr", "-1"], "--lr"),
        (["--preset", "huge"], "--preset"),
        (["--batch-size", "3", "--grad-accum", "2"], "divisible"),
        (["--context-min", "2"], "context"),
        (["--p-metronome", "1.5"], "p-metronome"),
        (["--target", "vocals", "--exclude", "vocals"], "exclude"),
        (["--speed-min", "0"], "speed"),
        (["--speed-max", "4.5"], "speed"),
        (["--speed-min", "1.3"], "speed"),  # above --speed-max
        (["--context-stems", "bass,gitar"], "unknown stem 'gitar'"),
        (["--exclude", "vocals", "--context-stems", "bass"], "not both"),
        (["--beat-tracker", "madmom"], "invalid choice"),
        (["--clip-mode", "max"], "invalid choice"),
        (["--precision", "fp8"], "invalid choice"),
        (["--p-full-context", "2"], "p-full-context"),
        (["--align-init", "--context-min", "0.1", "--context-max", "0.2"], "--align-init needs"),
        (["--p-copy-context", "-0.5"], "p-copy-context"),
        (["--max-steps", "x"], "invalid int"),
        (["--cooldown-steps", "5"], "--cooldown-steps must be in [0, --max-steps = 4]"),
        (["--cooldown-steps", "2"], "--cooldown-steps needs --cooldown-lr > 0"),
        (["--cooldown-steps", "2", "--cooldown-lr", "nan"], "--cooldown-lr must be a finite number"),
        (["--base", str(tmp_path / "nobase")], "not found"),
    ]
    for extra, message in bad:
        code, err = run_cli(args(setup, tmp_path / "r") + extra, capsys)
        assert code == 2, (extra, err)
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (extra, err)
    assert not (tmp_path / "r" / "latest").exists()

    run = tmp_path / "run"
    train.main(args(setup, run, steps=1))
    capsys.readouterr()
    for extra, message in [
        ([], "already holds a run"),  # never overwrite a run by accident
        (["--resume", "--target", "bass"], "target"),  # a checkpoint that does not fit the options
        (["--resume", "--dim", "128"], "dim"),
    ]:
        code, err = run_cli(args(setup, run, *extra) if "--target" not in extra else
                            [a if a != "drums" else "bass" for a in args(setup, run, "--resume")], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
    code, err = run_cli(args(setup, tmp_path / "empty", "--resume"), capsys)
    assert code == 2 and "holds no checkpoint" in err[0]
    (checkpoint(run) / T.STATE_FILE).write_bytes(b"broken")
    code, err = run_cli(args(setup, run, "--resume"), capsys)
    assert code == 2 and len(err) == 1 and "cannot read" in err[0]


def test_cli_error_from_a_real_process_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "none"), "--target", "drums",
                        "--out", str(tmp_path / "o"), "--preset", "tiny"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: data folder {tmp_path / 'none'} does not exist"]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ddp_step_equals_single_process(setup, tmp_path, grad_accum):
    """torchrun with 2 CPU processes (gloo), batch 2 each == one process with batch 4; also with
    gradient accumulation, where DDP must skip the gradient sync on all but the last micro-batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["--p-text-drop", "0.5", "--p-context-drop", "0.5", "--p-metronome", "0.5", "--grad-accum", str(grad_accum)]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(setup, single, *common, steps=1)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), *args(setup, multi, *common, steps=1)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"2 process(es), {2 // grad_accum} x {grad_accum} per process" in r.stderr
    a, b = lm_weights(single), lm_weights(multi)
    # a sync bug moves weights by the lr's order (1e-3); AdamW's first step is lr * g / (|g| + eps), so a
    # weight whose gradient is near eps (1e-8) moves by a few 1e-6 on the two sums' rounding alone
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())


STAGE_EFFECT_OPTIONS = [
    # short windows (0.2 s): the drums' own past says little, the context a lot; mixture contexts of
    # the bass only (it plays on every kick, whose pattern changes every bar), no metronome pairs
    "--target-seconds", "0.2", "--context-min", "0.2", "--context-max", "0.2", "--exclude", "vocals,chords",
    "--p-metronome", "0", "--no-augment", "--batch-size", "32", "--lr", "3e-3", "--dim", "64", "--layers", "2", "--heads", "4",
    "--eval-windows", "128", "--eval-every", "100", "--val-fraction", "0.2",
]


def test_stage_effect_context_lowers_target_loss(setup, tmp_path):
    """A few hundred CPU steps on synthetic songs: the held-out target loss with the real context
    is clearly lower than with the context dropped (early in training the two agree to 1e-4)."""
    run = tmp_path / "stage"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(setup, run, *STAGE_EFFECT_OPTIONS, steps=400)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    evals = [json.loads(line) for line in (run / T.METRICS_FILE).read_text().splitlines() if "val_loss" in line]
    first, last = evals[0], evals[-1]
    print(f"\nSTAGE effect after {last['step']} steps: val loss {last['val_loss']:.3f} with context, "
          f"{last['val_loss_nocontext']:.3f} with the context dropped")
    assert last["val_loss"] < first["val_loss"] - 0.05  # it trained
    assert last["val_loss"] < last["val_loss_nocontext"] - 0.02  # and it uses the context


def test_fp16_scaler_state_is_plain_numbers_and_loads_weights_only(tmp_path):
    from stage_min.io.loading import safe_torch_load

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # the CUDA scaler's logic, on CPU
    for _ in range(2):
        scaler.scale((w ** 2).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    state = T.scaler_state(scaler)
    assert state["scale"] == 4096.0 and all(isinstance(v, (int, float)) for v in state.values())
    torch.save({"scaler": state}, tmp_path / T.STATE_FILE)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(safe_torch_load(tmp_path / T.STATE_FILE)["scaler"])
    assert restored.get_scale() == 4096.0
    assert T.scaler_state(None) is None and T.scaler_state(torch.amp.GradScaler("cpu", enabled=False)) is None


def test_code_cache_cuts_the_same_windows_and_trains(setup, tmp_path):
    """--code-cache: a window's codes are those of its song encoded whole (checked slice by slice), agree
    with per-window encoding on nearly every code (they differ only near the window's edges), and a
    run with it trains; with augmentation on it is refused."""
    import numpy as np

    from stage_min.train import data as D
    from stage_min.io.pretrained import from_pretrained

    base, data = setup
    model = from_pretrained(str(base))
    codec = model.codec
    cfg = D.DataConfig(target="drums", target_seconds=1.0, context_min=1.0, context_max=1.0, p_full_context=0,
                       augment=False, p_metronome=0.5)
    stats = D.Stats()
    songs = [D.prepare_song(s, cfg, codec, "cpu", tmp_path / "cache", stats) for s in D.find_songs(data)[:12]]
    windows = D.StemWindows([s for s in songs if s is not None], cfg, codec.frame_rate, codec.sample_rate)
    codes = T.SongCodes(windows.songs, codec, "cpu")
    same, clicks = [], 0
    for i in range(24):
        e = windows.draw(np.random.default_rng([3, i]))
        clicks += e.metronome
        cut = T.make_batch(model, [e], [False], [False], "cpu", codes)
        alone = T.make_batch(model, [e], [False], [False], "cpu")
        stems = () if e.metronome else tuple(e.context_stems)
        whole = codes.codes[(e.song, stems)].long()
        n = cut["context"].shape[-1]
        assert torch.equal(cut["context"][0], whole[:, e.start:e.start + n])
        assert torch.equal(cut["codes"][0], codes.codes[(e.song, ("drums",))].long()[:, e.start:e.start + cut["codes"].shape[-1]])
        assert cut["context"].shape == alone["context"].shape and cut["codes"].shape == alone["codes"].shape
        same.append((cut["codes"] == alone["codes"]).float().mean().item())
        same.append((cut["context"] == alone["context"]).float().mean().item())
    assert 0 < clicks < 24  # both kinds of context were cut
    assert np.mean(same) > 0.8, np.mean(same)

    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(setup, tmp_path / "run", "--code-cache", "--no-augment", steps=3)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((checkpoint(tmp_path / "run") / "config.json").read_text())["step"] == 3
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(setup, tmp_path / "run2", "--code-cache")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--code-cache needs --no-augment" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run2").exists()


def test_loss_from_target_logits_only_equals_the_full_loss():
    """StageLoss makes logits for target steps only; the loss (and its gradient) is that of full logits."""
    from stage_min.model import LMConfig, MusicGenLM
    from stage_min.stage import StageLoss, build_sequence, first_target_logit, target_loss

    torch.manual_seed(0)
    cfg = LMConfig(dim=64, n_layers=2, n_heads=2, card=32, n_special=2, text_dim=16, ffn_dim=128)
    lm = MusicGenLM(cfg)
    context, codes = torch.randint(0, 32, (3, 4, 9)), torch.randint(0, 32, (3, 4, 7))
    seq = build_sequence(context, codes, 7, cfg.special_id, cfg.context_id, torch.tensor([9, 5, 2]),
                         torch.tensor([False, False, True]))
    states, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    first = first_target_logit(seq.target)
    assert first == 10  # the separator: the start step and 9 context steps come before it
    fast = StageLoss(lm)(seq.grid, seq.keep, seq.target, states, mask)
    (g_fast,) = torch.autograd.grad(fast, lm.layers[0].ffn_in.weight)
    full = target_loss(lm(seq.grid, lm.project_text(states, mask), mask, seq.keep), seq.grid, seq.target)
    (g_full,) = torch.autograd.grad(full, lm.layers[0].ffn_in.weight)
    assert abs(fast.item() - full.item()) < 1e-6 and full.item() > 1
    torch.testing.assert_close(g_fast, g_full)


def test_aligned_init_attends_from_target_frame_t_to_context_frame_t():
    """init_aligned's head: at init, each step puts most of its attention on the steps around `offset`
    back (by position alone, whatever the codes), so target frame t starts out reading context frame t."""
    import math

    from einops import rearrange

    from stage_min.model import LMConfig, MusicGenLM, sinusoidal_positions

    torch.manual_seed(0)
    lm = MusicGenLM(LMConfig(dim=128, n_layers=2, n_heads=4, card=256, n_special=2, text_dim=32))
    S, offset = 300, 101
    codes = torch.randint(0, 256, (2, 4, S))
    rows = torch.arange(offset, S)

    @torch.no_grad()
    def head0_weight(lags):  # mean attention weight of head 0, layer 0 on the steps `offset + lag` back
        x = sum(e(codes[:, k]) for k, e in enumerate(lm.embed)) + sinusoidal_positions(torch.arange(S), 128)
        q, k, _ = rearrange(lm.layers[0].self_attn.qkv(lm.layers[0].norm_self(x)), "b s (three h d) -> three b h s d",
                            three=3, h=4)
        scores = (q[:, 0] @ k[:, 0].transpose(-1, -2)) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        return float(sum(weights[:, rows, rows - offset - lag] for lag in lags).mean())

    assert head0_weight([0]) < 0.02 and head0_weight(range(-2, 3)) < 0.05  # PyTorch's init: spread over ~200 steps
    T.init_aligned(lm, offset)
    assert head0_weight([0]) > 0.2 and head0_weight(range(-2, 3)) > 0.6
    assert abs(float(lm.embed[0].weight.detach().std()) - 0.3) < 0.01
