"""Fine-tuning the bigger sizes: LoRA end to end (train, resume, sample, merge), activation
checkpointing, the memory plan against measured CPU peaks, and FSDP2 on CPU processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_hf
from stage_min.io.pretrained import from_pretrained
from stage_min.toy import synth, tiny
from stage_min.train import lora
from stage_min.train import training as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base folder, dataset folder): a tiny pretrained-style MusicGen (dim 64) and synthetic songs."""
    root = tmp_path_factory.mktemp("finetune")
    data = synth.write_dataset(root / "data", n_songs=24, seconds=4.0, seed=2)
    base = root / "base"
    base.mkdir()
    build_tiny_hf(base)
    tiny.make_codec_hear(base, sorted(data.glob("song_00[0-3]/drums.wav")))
    return base, data


def args(setup, out, *extra, steps=4):
    base, data = setup
    return ["--data", str(data), "--target", "drums", "--preset", "small", "--base", str(base), "--out", str(out),
            "--target-seconds", "1", "--context-min", "0.5", "--context-max", "1", "--batch-size", "4",
            "--eval-windows", "4", "--eval-every", "1000", "--lr", "3e-3", "--max-steps", str(steps), *extra]


LORA = ["--lora-rank", "4", "--lora-targets", "q,k,v,out,ffn"]


def latest(run):
    return T.latest_checkpoint(Path(run))


def test_lora_run_learns_keeps_the_base_and_stores_adapters_only(setup, tmp_path, monkeypatch):
    """Loss falls over a few steps (same fixed batch each step: --no-augment, no drops), every base
    weight is unchanged bit for bit, and the checkpoint holds the adapters only (< 5 % of a full one)."""
    base, _ = setup
    kept = {}
    real_save = train.save

    def keep_model(run):
        kept["lm"] = run.model.lm
        real_save(run)

    monkeypatch.setattr(train, "save", keep_model)
    fixed = ["--no-augment", "--p-text-drop", "0", "--p-context-drop", "0", "--p-word-drop", "0", "--log-every", "1",
             "--seed", "1"]
    monkeypatch.setattr(T, "draw_examples", lambda w, cfg, step, micro, idx, real=T.draw_examples: real(w, cfg, 0, micro, idx))
    run = tmp_path / "lora"
    train.main(args(setup, run, *LORA, *fixed, steps=8))
    losses = [json.loads(line)["loss"] for line in (run / T.METRICS_FILE).read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.05, losses

    ref = from_pretrained(str(base), stage=True).lm.state_dict()
    trained = kept["lm"].state_dict()
    for k, v in ref.items():
        if k.startswith("embed."):  # all rows but the context token's (trained) and the special row (zeroed, as full runs)
            assert torch.equal(trained[k][:2048], v[:2048]), k
        else:
            assert torch.equal(trained[k], v), k
    stored = load_file(str(latest(run) / "model.safetensors"))
    assert all(".lora_" in k or k.endswith(".context_row") for k in stored)
    config = json.loads((latest(run) / "config.json").read_text())
    assert config["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "k", "v", "out", "ffn"]}

    full = tmp_path / "full"
    train.main(args(setup, full, steps=1))
    size = lambda r: sum(f.stat().st_size for f in latest(r).iterdir())  # noqa: E731
    print(f"\nadapters-only checkpoint {size(run)} bytes, full checkpoint {size(full)} bytes")
    assert size(run) < 0.05 * size(full)


def test_merged_logits_equal_the_adapter_model(setup, tmp_path):
    """from_pretrained(run) (sample.py's load) merges the adapters into plain weights; its logits equal the
    training model's within 1e-5; convert writes the merged model as a plain, self-contained folder."""
    torch.manual_seed(0)
    cfg = T.TrainConfig(base=str(setup[0]), lora_rank=4, lora_targets="q,v,out,ffn", seed=3)
    model, _ = T.build_model(cfg)
    with torch.no_grad():  # as if trained: non-zero B and a moved context row
        for n, p in model.lm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / "run"
    out.mkdir()
    opt = T.make_optimizer(model.lm, cfg)
    T.save_checkpoint(out, model.lm, str(setup[0]), 1, cfg, opt)
    merged = from_pretrained(str(out))
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.lm.modules())
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2050, (2, 4, 30), generator=g)
    text, mask = torch.randn(2, 5, 64, generator=g), torch.ones(2, 5, dtype=torch.bool)
    model.lm.eval()
    with torch.no_grad():
        a = model.lm(codes, text, mask)
        b = merged.lm(codes, text, mask)
    assert (a - b).abs().max() < 1e-5, (a - b).abs().max()

    dst = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "stage_min.io.convert", str(out), str(dst)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    config = json.loads((dst / "config.json").read_text())
    assert "lora" not in config and config["base"] is None
    again = from_pretrained(str(dst))
    with torch.no_grad():
        assert (again.lm(codes, text, mask) - b).abs().max() < 1e-6


def test_lora_resume_sample_and_errors(setup, tmp_path, capsys):
    """Ctrl-C-free resume: 2 + 2 steps end where 4 uninterrupted steps end; sample.py loads the run."""
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(args(setup, full, *LORA, steps=4))
    train.main(args(setup, part, *LORA, steps=2))
    train.main(args(setup, part, *LORA, "--resume", steps=4))
    a, b = load_file(str(latest(full) / "model.safetensors")), load_file(str(latest(part) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    wav = tmp_path / "x.wav"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(part), "--prompt", "drums",
                        "--duration", "0.2", "--out", str(wav), "--seed", "0"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    capsys.readouterr()
    for argv, message in [(args(setup, part, "--resume", steps=5), "pass its --lora-rank"),
                          (args(setup, part, "--lora-rank", "8", "--resume", steps=5), "lora_rank"),
                          (args(setup, tmp_path / "t", "--preset", "tiny", "--lora-rank", "4"), "--lora-rank adapts a pretrained LM"),
                          (args(setup, tmp_path / "t", "--lora-rank", "4", "--lora-targets", "q,x"), "--lora-targets must be")]:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_activation_checkpointing_gives_the_same_gradients():
    from stage_min.model import LMConfig, MusicGenLM
    from stage_min.stage import StageLoss, build_sequence

    torch.manual_seed(0)
    lm = MusicGenLM(LMConfig(dim=64, n_layers=2, n_heads=2, card=32, n_special=2, text_dim=16, ffn_dim=128))
    seq = build_sequence(torch.randint(0, 32, (2, 4, 6)), torch.randint(0, 32, (2, 4, 5)), 5, 32, 33,
                         torch.tensor([6, 3]), torch.tensor([False, True]))
    states, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    grads = []
    for on in (False, True):
        lm.checkpoint_blocks = on
        lm.zero_grad()
        StageLoss(lm)(seq.grid, seq.keep, seq.target, states, mask).backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_plan_prints_the_memory_and_trains_nothing(setup, tmp_path, capsys):
    run = tmp_path / "planned"
    train.main(args(setup, run, "--plan", "--preset", "medium", "--lora-rank", "16", "--checkpoint-activations",
                    "--gpu-memory", "24", "--batch-size", "8", "--target-seconds", "10", "--context-max", "10"))
    text = capsys.readouterr().out
    assert "--preset medium" in text and "LoRA rank 16" in text and "largest micro-batch that fits 24 GiB" in text
    for part in ("parameters", "gradients", "optimizer states", "activations", "peak"):
        assert part in text
    assert not run.exists()  # nothing written, no model loaded


TINY = dict(dim=256, n_layers=4, n_heads=4, n_special=2)


@pytest.mark.parametrize("batch,frames,lora_rank,checkpoint", [(8, 100, 0, False), (8, 100, 0, True), (8, 100, 8, False),
                                                               (2, 250, 8, True)])
def test_plan_matches_the_measured_cpu_peak(batch, frames, lora_rank, checkpoint):
    """--plan's estimate of a step's peak against the measured peak of real CPU steps (tiny shapes here;
    small shapes in docs/training.md): within 15 %."""
    from stage_min.model import LMConfig
    from stage_min.train import memory

    spec = lora.LoraSpec(lora_rank, 2.0 * lora_rank) if lora_rank else None
    s = memory.Shape(LMConfig(**TINY), batch, frames, frames, spec, checkpoint)
    estimated, measured = memory.estimate(s)["peak_lm"], memory.measure_peak(s)
    print(f"\nestimated {estimated / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert abs(estimated / measured - 1) < 0.15


def torchrun(*argv, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else [sys.executable]
    return subprocess.run([*launch, str(ROOT / "train.py"), *argv], capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize("extra", [[], LORA + ["--checkpoint-activations", "--clip-mode", "norm"]])
def test_fsdp_on_two_cpu_processes_equals_one_process_and_resumes(setup, tmp_path, extra):
    """FSDP2 (gloo, 2 CPU processes): killed with SIGKILL after its first checkpoint (or stopped after 2 steps),
    then resumed to 3 steps, equals one process's 3 steps; the run folder holds the whole model (sample.py and
    convert read it as any run) and one optimizer shard per rank."""
    common = ["--p-text-drop", "0.5", "--p-context-drop", "0.5", "--grad-accum", "2", "--no-augment", "--code-cache", *extra]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    r = torchrun(*args(setup, single, *common, steps=3), n=1)
    assert r.returncode == 0, r.stderr[-3000:]
    if not extra:  # killed (SIGKILL, the whole process group) as soon as its first checkpoint is in place
        import signal
        import time

        log = open(tmp_path / "killed.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(ROOT / "train.py"), *args(setup, sharded, *common, "--fsdp", "--save-every", "1", steps=3)],
                                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log, start_new_session=True)
        while not (sharded / "latest").exists() and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
        assert "2 process(es) (FSDP)" in (tmp_path / "killed.log").read_text()
    else:
        r = torchrun(*args(setup, sharded, *common, "--fsdp", steps=2))
        assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in latest(sharded).iterdir()} == {"config.json", "model.safetensors", T.STATE_FILE, "train_state.1.pt"}
    r = torchrun(*args(setup, sharded, *common, "--fsdp", "--resume", steps=3))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(latest(single) / "model.safetensors")), load_file(str(latest(sharded) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    r = torchrun(*args(setup, sharded, *common, "--resume", steps=4), n=1)  # a sharded run resumes sharded only
    assert r.returncode == 2 and "resume it with --fsdp and 2 processes" in r.stderr and "Traceback" not in r.stderr
    dst = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "stage_min.io.convert", str(sharded), str(dst)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_adamw8bit_trains_saves_weights_only_and_resumes(setup, tmp_path):
    """--optimizer adamw8bit (bitsandbytes, CPU here): its 8-bit states load with weights_only, a resumed
    run ends where an uninterrupted one does, and --plan counts 2 bytes of state per trained parameter."""
    pytest.importorskip("bitsandbytes")
    from stage_min.train import memory

    opts = ["--optimizer", "adamw8bit", "--no-augment", "--code-cache", "--batch-size", "2", "--eval-windows", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(args(setup, full, *opts, steps=2))
    train.main(args(setup, part, *opts, steps=1))
    state = torch.load(latest(part) / T.STATE_FILE, weights_only=True)
    quantized = [v for s in state["optimizer"]["state"].values() for v in s.get("__bnb_optimizer_quant_state__", {}).values()]
    assert any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in quantized)  # the 8-bit moments
    train.main(args(setup, part, *opts, "--resume", steps=2))
    a, b = load_file(str(latest(full) / "model.safetensors")), load_file(str(latest(part) / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    eight = memory.estimate(memory.shape_of(T.TrainConfig(preset="medium", optimizer="adamw8bit")))
    assert eight["optimizer"] * 4 == memory.estimate(memory.shape_of(T.TrainConfig(preset="medium")))["optimizer"]
