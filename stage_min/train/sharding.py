"""--fsdp: the LM sharded over the processes of a torchrun (FSDP2, torch.distributed.fsdp.fully_shard),
instead of DDP's one whole replica per process: parameters, gradients and AdamW states each take
1 / processes of their memory on every GPU (the activations stay per process).

Units: each Block, each Block's cross-attention key/value projection (run before its Block, by
MusicGenLM._cross_inputs, so it must gather its own weight) and the text projection; the root is
StageLoss (the text projection runs before the LM's forward, both under its forward) and holds the
embeddings, the final norm and the heads. Evaluation goes through the same root, on every rank.

Checkpoints: the model is gathered onto rank 0 (on the CPU) and written as every run's model.safetensors,
so sample.py, --resume and `python -m stage_min.io.convert` read it as any other run; the optimizer
states, the bulk of a full fine-tuning checkpoint, stay sharded: each rank writes its own
train_state.pt / train_state.RANK.pt into the same temporary step folder, which rank 0 renames only
when all are written (a kill -9 at any moment leaves the previous complete step folder). Resuming
needs the same number of processes.
"""
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..model import MusicGenLM


def shard(loss_fn, device: torch.device):
    """Shard stage.StageLoss(lm) in place: the loss module is the root, so that the text projection (called
    before the LM's forward) and the LM run under one root's forward; returns it."""
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    lm = loss_fn.lm
    fully_shard(lm.text_proj, mesh=mesh)
    for block in lm.layers:
        fully_shard(block.cross_attn.kv, mesh=mesh)
        fully_shard(block, mesh=mesh)
    return fully_shard(loss_fn, mesh=mesh)


def full_state(lm: MusicGenLM) -> dict:
    """The whole LM's state on rank 0's CPU (every rank must call it; the others get {})."""
    return get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_optimizer_state(optimizer) -> dict:
    """This rank's shard of the optimizer state as plain tensors (loads with weights_only)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.to_local().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_optimizer_shard(optimizer, saved: dict):
    """The inverse of local_optimizer_state: each state tensor wrapped back as a shard of its parameter."""
    optimizer.load_state_dict(saved)
    for p, s in optimizer.state.items():
        if isinstance(p, DTensor):
            for k, v in s.items():
                if torch.is_tensor(v) and v.dim() > 0 and not isinstance(v, DTensor):
                    s[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                              shape=p.shape, stride=p.stride())


def shared_temporary(out: Path, name: str) -> Path:
    """A temporary step folder made by rank 0, its name sent to every rank."""
    box = [str(tempfile.mkdtemp(prefix=f".{name}.", dir=out))] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def rank_file(state_file: str, rank: int) -> str:
    return state_file if rank == 0 else state_file.replace(".pt", f".{rank}.pt")
