"""What a training step reads and what a save leaves behind, each checked where a plausible bug would show.

- The loss of a STAGE batch (through train.make_batch and StageLoss) reads target frames only: the
  same logits score the same whatever the context's codes, and differently when a target code changes.
- write_atomic never exposes a half-written file: a writer that fails part-way (an exception after
  N bytes, a full disk in a shim under safetensors, a `kill -9` of the writing process) leaves the
  previous file whole, or no file.
- save_checkpoint writes a step folder under a temporary name: while its files are being written, and
  after a crash part-way, no folder holds the step's final name, and `latest` names the previous one.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from stage_min.io import loading
from stage_min.model import LMConfig, MusicGenLM
from stage_min.stage import StageLoss
from stage_min.train import training as T
from stage_min.train.data import Example

ROOT = Path(__file__).resolve().parents[1]


# ---- the loss reads target frames only ------------------------------------------------------------
class StubCodec:
    """A codec whose codes follow the audio exactly (frame means, quantised): different audio, different codes."""
    hop, n_codebooks, card = 4, 4, 32

    def encode(self, x):  # (B, 1, N) -> (B, K, N // hop)
        B, _, N = x.shape
        level = torch.round(x[:, 0, : N // self.hop * self.hop].reshape(B, -1, self.hop).mean(-1) * 10).long()
        return torch.stack([(level + 7 * k) % self.card for k in range(self.n_codebooks)], dim=1)


class StubText:
    def __call__(self, captions):
        return torch.ones(len(captions), 3, 16), torch.ones(len(captions), 3, dtype=torch.bool)


class StubModel:
    def __init__(self):
        self.lm = MusicGenLM(LMConfig(dim=32, n_layers=1, n_heads=2, card=32, n_special=2, text_dim=16, ffn_dim=64))
        self.codec, self.text_encoder = StubCodec(), StubText()


class FixedLogits(nn.Module):
    """An LM whose logits are fixed numbers: the loss can then change only through the tokens it scores."""

    def __init__(self, lm, logits):
        super().__init__()
        self.cfg, self.logits = lm.cfg, logits

    def project_text(self, states, mask):
        return states

    def forward(self, grid, text, mask, keep=None, first_logit=0):
        assert self.logits.shape[:3] == grid.shape
        return self.logits[:, :, first_logit:]


def frames(values) -> np.ndarray:
    """Audio of one frame (hop samples) per value: the stub codec gives code round(10 * value)."""
    return np.repeat(np.asarray(values, dtype=np.float32), StubCodec.hop)


def loss_of(model, contexts, targets, logits=None):
    examples = [Example(song=f"s{i}", start=0, target=frames(t), context=frames(c), caption="drums", metronome=False)
                for i, (c, t) in enumerate(zip(contexts, targets))]
    batch = T.make_batch(model, examples, [False] * len(examples), [False] * len(examples), "cpu")
    if logits is None:
        logits = torch.randn(*batch["grid"].shape, model.lm.cfg.card, generator=torch.Generator().manual_seed(0))
    loss = StageLoss(FixedLogits(model.lm, logits))(batch["grid"], batch["keep"], batch["target"], batch["states"], batch["mask"])
    return loss.item(), batch, logits


def test_training_loss_ignores_the_context_frames_and_reads_the_target_frames():
    """Two rows (contexts of 5 and 3 frames, right-aligned by the batch builder), 6 target frames each.
    Changing every context code leaves the loss of the same logits exactly as it was; changing one
    target code changes it. (A batch builder whose loss mask also covered the context passed every
    other test: the STAGE effect, resume and loss-equality tests all hold with it.)"""
    model = StubModel()
    rng = np.random.default_rng(0)
    contexts = [rng.uniform(0, 3, 5), rng.uniform(0, 3, 3)]
    targets = [rng.uniform(0, 3, 6), rng.uniform(0, 3, 6)]
    base, batch, logits = loss_of(model, contexts, targets)
    assert 1 < base < 10
    assert batch["lengths"].tolist() == [5, 3]

    other = [c + 1.0 for c in contexts]  # every context frame gets another code
    changed, batch2, _ = loss_of(model, other, targets, logits)
    context_steps = ~batch["target"] & (batch["grid"] < model.lm.cfg.card)  # real codes outside the target
    assert not torch.equal(batch["grid"][context_steps], batch2["grid"][context_steps])
    assert torch.equal(batch["target"], batch2["target"])
    assert changed == base

    moved = [t.copy() for t in targets]
    moved[1][2] += 1.0  # one target frame of one row
    assert loss_of(model, contexts, moved, logits)[0] != base


# ---- write_atomic: never a half-written file ------------------------------------------------------
class DiskFull(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device (test)")


def failing_writer(n_bytes, seen, path):
    """Writes n_bytes of new content, records what `path` holds at that moment, then fails."""
    def write(p):
        with open(p, "wb") as f:
            f.write(b"N" * n_bytes)
            f.flush()
            seen.append(path.read_bytes() if path.exists() else None)
            raise DiskFull()
    return write


@pytest.mark.parametrize("n_bytes", [0, 1, 4096])
def test_write_atomic_failing_part_way_keeps_the_previous_file(tmp_path, n_bytes):
    path = tmp_path / "config.json"
    old = b"O" * 10000
    path.write_bytes(old)
    seen = []
    with pytest.raises(DiskFull):
        loading.write_atomic(path, failing_writer(n_bytes, seen, path))
    assert seen == [old]  # while the new content was being written, the file was still the old one
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # the temporary file is removed
    # a first write that fails leaves no file at all
    fresh = tmp_path / "new.json"
    with pytest.raises(DiskFull):
        loading.write_atomic(fresh, failing_writer(n_bytes, [], fresh))
    assert not fresh.exists()
    loading.write_atomic(path, lambda p: p.write_bytes(b"whole"))
    assert path.read_bytes() == b"whole"


@pytest.mark.parametrize("fail_after", [0, 100, 0.5])
def test_save_native_on_a_full_disk_keeps_the_previous_files(tmp_path, monkeypatch, fail_after):
    """A filesystem shim under safetensors: the file gets only its first bytes, then the disk is full."""
    import safetensors.torch

    torch.manual_seed(0)
    lm = MusicGenLM(LMConfig(dim=32, n_layers=1, n_heads=2, card=64, text_dim=16, ffn_dim=64))
    loading.save_native(tmp_path, lm.state_dict(), lm.cfg, base="base")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = safetensors.torch.save_file

    def shim(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as f:
            f.truncate(int(size * fail_after) if isinstance(fail_after, float) else fail_after)
        raise DiskFull()

    monkeypatch.setattr(safetensors.torch, "save_file", shim)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(1.0)
    with pytest.raises(DiskFull):
        loading.save_native(tmp_path, lm.state_dict(), lm.cfg, base="base")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


WRITER = """
import sys, time
from pathlib import Path
from stage_min.io.loading import write_atomic

def write(p):
    with open(p, "wb") as f:
        f.write(b"N" * 5000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)  # killed here, part-way through the file
        f.write(b"N" * 5000)

write_atomic(Path(sys.argv[1]), write)
"""


def test_write_atomic_killed_part_way_leaves_the_previous_file(tmp_path):
    path = tmp_path / "latest"
    old = b"step-00000001\n"
    path.write_bytes(old)
    (tmp_path / "step-00000001").mkdir()
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert path.read_bytes() == old
    # what the kill left is a hidden temporary file, which remove_stale deletes
    leftovers = [q.name for q in tmp_path.iterdir() if q.name not in ("latest", "step-00000001")]
    assert all(n.startswith(".latest.") and n.endswith(".tmp") for n in leftovers), leftovers
    T.remove_stale(tmp_path)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["latest", "step-00000001"]


# ---- save_checkpoint: a step folder appears under its name only when complete ----------------------
def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_checkpoint_folder_is_written_under_a_temporary_name(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lm = MusicGenLM(LMConfig(dim=32, n_layers=1, n_heads=2, card=64, n_special=2, text_dim=16, ffn_dim=64))
    cfg = T.TrainConfig(preset="tiny", lr=1e-3)
    optimizer = T.make_optimizer(lm, cfg)
    run = tmp_path / "run"
    run.mkdir()
    T.save_checkpoint(run, lm, "base", 1, cfg, optimizer)
    step1 = folder_digest(run / "step-00000001")
    assert sorted(step1) == ["config.json", "model.safetensors", T.STATE_FILE]

    real = T.save_native
    during = []

    def crash_part_way(folder, *a, **kw):
        during.append(sorted(p.name for p in run.iterdir()))  # what a reader (or a kill) sees at this moment
        real(folder, *a, **kw)
        (Path(folder) / "model.safetensors").write_bytes(b"half")  # a partial file, then the crash
        raise DiskFull()

    monkeypatch.setattr(T, "save_native", crash_part_way)
    with pytest.raises(T.SaveError, match="is the disk full.*step-00000001 .* is kept"):  # the failure, said in one line
        T.save_checkpoint(run, lm, "base", 2, cfg, optimizer)
    assert len(during) == 1 and "step-00000002" not in during[0], during
    assert not (run / "step-00000002").exists()
    assert (run / "latest").read_text().strip() == "step-00000001"
    assert folder_digest(run / "step-00000001") == step1
    T.remove_stale(run)
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-00000001"]

    monkeypatch.setattr(T, "save_native", real)
    T.save_checkpoint(run, lm, "base", 2, cfg, optimizer)
    assert (run / "latest").read_text().strip() == "step-00000002"
    assert json.loads((run / "step-00000002" / "config.json").read_text())["step"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-00000002"]
