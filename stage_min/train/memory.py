"""The memory a training run needs, before it starts: `train.py ... --plan`.

    plan = estimate(cfg)        # bytes of parameters, gradients, optimizer states, activations
    print(plan_text(cfg))       # the table, and the largest batch that fits --gpu-memory

What is counted (per process, the LM's training step; T5 and EnCodec are a fixed amount beside it):
- parameters: fp32 master weights (autocast computes in half but keeps them fp32);
- gradients and AdamW's two moments: fp32, of the trained parameters only (LoRA: adapters and context rows);
- activations: what autograd keeps for the backward, per token of the sequence (context, separator,
  target and the codebook delay: S = C + T + K + 2 steps) and per layer, counted from the block's
  operations (model.Block): layer norm inputs, Linear inputs, the attention's q, k, v, output and its
  reshaped copy, the GELU input and output; plus the output heads' logits over the target steps, their
  float copy, log-softmax and gradient. With --checkpoint-activations only each block's input is kept,
  plus one block's activations while it is recomputed. The attention itself keeps no S x S matrix
  (SDPA's flash and memory-efficient kernels, and CPU's flash kernel; only the masks are S x S).
- the peak: at the start of the backward all activations are held and few gradients, at its end all
  gradients and few activations; memory moves between the two linearly, layer by layer, so the peak
  is the larger end.

Validated on CPU against the measured peak resident memory of real steps (measure_peak, in a fresh
process with glibc's mmap threshold low, so that freed tensors leave the resident set at once):
tests/test_finetune.py and docs/training.md. GPU figures (half-precision activations, the CUDA
caching allocator's slack, cuBLAS workspaces) are estimated, not measured.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace

from ..model import PRESETS, LMConfig

GiB = 1024 ** 3
T5_BASE_PARAMS = 109_628_544  # google-t5/t5-base encoder, frozen (fp32 on every device)
ENCODEC_PARAMS = 56_914_080  # facebook/encodec_32khz, frozen
FRAME_RATE = 50  # EnCodec 32 kHz: frames per second
TEXT_TOKENS = 32  # a prompt's T5 tokens, generously (prompts are a few words)
CUDA_OVERHEAD = 0.75 * GiB  # CUDA context, cuBLAS workspaces, allocator slack (estimated)


@dataclass
class Shape:
    """What the estimate needs of a run: the LM's shape and the step's sizes."""
    lm: LMConfig
    batch: int  # examples per micro-batch per process
    context_frames: int
    target_frames: int
    lora: object = None  # lora.LoraSpec or None
    checkpoint: bool = False
    half: bool = False  # bf16/fp16 autocast (CUDA)
    optimizer_bytes: int = 8  # AdamW's two fp32 moments per trained parameter
    shards: int = 1  # --fsdp: processes the parameters, gradients and optimizer states are sharded over

    @property
    def steps(self) -> int:
        return 1 + self.context_frames + 1 + self.target_frames + self.lm.n_codebooks


def lm_shape(cfg) -> LMConfig:
    """The preset's LM (tiny with its --dim/--layers/--heads), with the context token."""
    overrides = {k: v for k, v in (("dim", cfg.dim), ("n_layers", cfg.layers), ("n_heads", cfg.heads)) if v}
    lm = replace(PRESETS[cfg.preset], n_special=2, **overrides)
    return LMConfig(**{**lm.__dict__, "ffn_dim": 0 if "dim" in overrides else lm.ffn_dim})


def shape_of(cfg, batch: int | None = None, half: bool | None = None) -> Shape:
    d = cfg.data_cfg
    micro = batch if batch is not None else max(1, cfg.batch_size // cfg.grad_accum)
    return Shape(lm_shape(cfg), micro, round(d.context_max * FRAME_RATE), round(d.target_seconds * FRAME_RATE),
                 cfg.lora_spec(), cfg.checkpoint_activations, cfg.precision != "fp32" if half is None else half,
                 optimizer_bytes=2 if cfg.optimizer == "adamw8bit" else 8, shards=cfg.plan_processes if cfg.fsdp else 1)


def counts(s: Shape) -> tuple[int, int]:
    """(LM parameters, trained parameters)."""
    c, d, f, K = s.lm, s.lm.dim, s.lm.ffn_dim, s.lm.n_codebooks
    per_layer = 3 * d * d + d * d + d * d + 2 * d * d + d * d + 2 * d * f + 6 * d
    total = K * c.vocab_in * d + c.text_dim * d + d + c.n_layers * per_layer + 2 * d + K * c.card * d
    if s.lora is None:
        return total, total
    r, t = s.lora.rank, s.lora.targets
    adapters = sum(r * (d + d) for name in ("q", "k", "v", "out") if name in t) * 2  # self- and cross-attention
    adapters += r * (d + f) * 2 if "ffn" in t else 0
    return total, c.n_layers * adapters + K * d


def per_token_layer(s: Shape) -> int:
    """Bytes one block keeps per token for the backward (model.Block; counted with saved_tensors_hooks on CPU:
    20 x dim floats in full fp32 training). A Linear keeps its input only when its weight is trained, which
    under LoRA is the adapted ones; autocast keeps the half-precision copies a Linear or SDPA computes in."""
    d, f, half = s.lm.dim, s.lm.ffn_dim, 2 if s.half else 4
    t = ("q", "k", "v", "out", "ffn") if s.lora is None else s.lora.targets
    norm_inputs = 3 * d * 4  # the residual stream into each layer norm, fp32
    linear_inputs = d * (any(x in t for x in "qkv") + ("q" in t) + ("ffn" in t)) * half  # the three norms' outputs
    attention = (3 * d + d + d + d) * half  # self: q, k, v, output (= out's input); cross: q, output
    ffn = f * half + (f * half if "ffn" in t else 0)  # GELU's input; its output is ffn_out's input
    return norm_inputs + linear_inputs + attention + ffn


def activations(s: Shape) -> tuple[int, int]:
    """(bytes of everything kept for the backward, bytes of the output heads' part). The heads' part: the
    target logits as floats, kept by the cross-entropy (the logits before it are freed)."""
    c, d, K, B, S = s.lm, s.lm.dim, s.lm.n_codebooks, s.batch, s.steps
    per_layer = B * S * per_token_layer(s)
    layers = (B * S * d * 4 + B * S * d // 8) * c.n_layers if s.checkpoint else per_layer * c.n_layers  # block inputs
    n_target = B * K * (s.target_frames + 1)
    head = n_target * c.card * 4 + (B * (s.target_frames + K + 1) * d * (2 if s.half else 4) if s.lora is None else 0)
    masks = B * S * S  # the self-attention mask (bool), shared by the layers
    text = B * TEXT_TOKENS * (c.text_dim + 3 * d * c.n_layers) * 4  # projected text, cross keys/values
    return layers + head + masks + text + B * S * d * 4, head


def estimate(s: Shape) -> dict:
    """Bytes of each part and the peak of one training step (LM only, plus the frozen T5 and EnCodec)."""
    n_all, n_trained = counts(s)
    n = s.shards  # FSDP: each process holds 1/n, plus the units it has gathered (the root: embeddings and heads,
    # for the whole step; two blocks at a time, the one running and the one prefetched)
    c = s.lm
    gathered = 0 if n == 1 else 4 * (2 * c.n_codebooks * c.vocab_in * c.dim + 2 * (16 * c.dim * c.dim))
    params = 4 * n_all // n + gathered
    grads = 4 * n_trained // n + (gathered if s.lora is None else 0)  # a unit's full gradients before its reduce-scatter
    optimizer = s.optimizer_bytes * n_trained // n
    act, head = activations(s)
    B = s.batch
    # start of the backward: everything kept, plus the logits' gradients (the target logits' and the full
    # logits tensor's) and the heads' weight gradients; end: all gradients (+ one block recomputed)
    logit_grads = 2 * B * c.n_codebooks * (s.target_frames + c.n_codebooks + 1) * c.card * 4
    head_grads = 4 * c.n_codebooks * c.card * c.dim if s.lora is None else 0
    block = B * s.steps * per_token_layer(s) if s.checkpoint else 0
    peak_lm = params + optimizer + max(act + logit_grads + head_grads, grads + block)
    frozen = 4 * (T5_BASE_PARAMS + ENCODEC_PARAMS)
    return {"parameters": params, "gradients": grads, "optimizer": optimizer, "activations": act,
            "peak_lm": peak_lm, "frozen_t5_encodec": frozen, "peak": peak_lm + frozen, "n_params": n_all, "n_trained": n_trained}


def largest_batch(cfg, gpu_bytes: float, half: bool) -> int:
    """The largest micro-batch whose peak (+ CUDA overhead) fits gpu_bytes; 0 if none."""
    best = 0
    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128):
        if estimate(shape_of(cfg, batch=b, half=half))["peak"] + CUDA_OVERHEAD <= gpu_bytes:
            best = b
    return best


def plan_text(cfg) -> str:
    s = shape_of(cfg)
    e = estimate(s)
    half = cfg.precision != "fp32"
    gb = lambda n: f"{n / GiB:7.2f} GiB"  # noqa: E731
    mode = f"LoRA rank {s.lora.rank} on {','.join(s.lora.targets)}" if s.lora else "full fine-tuning"
    fsdp = f", sharded over {s.shards} processes (--fsdp)" if s.shards > 1 else ""
    lines = [f"memory plan (estimated; per process{fsdp}): --preset {cfg.preset} ({e['n_params'] / 1e6:.0f}M LM parameters, "
             f"{e['n_trained'] / 1e6:.2f}M trained: {mode}), micro-batch {s.batch}, {s.context_frames} context + "
             f"{s.target_frames} target frames ({s.steps} steps), {cfg.precision} on CUDA (fp32 on CPU), "
             f"activation checkpointing {'on' if s.checkpoint else 'off'}",
             f"  parameters (fp32)           {gb(e['parameters'])}",
             f"  gradients                   {gb(e['gradients'])}",
             f"  {'optimizer states (' + cfg.optimizer + ')':28}{gb(e['optimizer'])}",
             f"  activations                 {gb(e['activations'])}",
             f"  peak of a step (LM)         {gb(e['peak_lm'])}",
             f"  T5 + EnCodec (frozen)       {gb(e['frozen_t5_encodec'])}",
             f"  peak                        {gb(e['peak'])}  (+ ~{CUDA_OVERHEAD / GiB:.2f} GiB CUDA context and allocator slack)"]
    fits = largest_batch(cfg, cfg.gpu_memory * GiB, half)
    lines.append(f"largest micro-batch that fits {cfg.gpu_memory:g} GiB: {fits}" + (
        "" if fits else " (none: try --lora-rank, --checkpoint-activations, a shorter --target-seconds/--context-max, "
                        "or FSDP over several GPUs)"))
    return "\n".join(lines)


# ---- validation: the estimate against the measured peak of real CPU steps --------------------------
def measure_peak(s: Shape, steps: int = 2, timeout: float = 600) -> int:
    """Peak resident-memory growth (bytes) of `steps` optimizer steps of an LM of shape s on CPU, in a fresh
    process. Why resident memory: PyTorch's CPU allocator keeps no statistics (torch.cuda.max_memory_allocated
    has no CPU twin) and tracemalloc does not see tensor storage; with MALLOC_MMAP_THRESHOLD_ low every
    tensor of 64 KiB or more is its own mapping, returned to the system when freed, so the resident peak
    follows the live tensors. The peak (VmHWM) is reset after the imports and a warm-up step (Linux's
    /proc/self/clear_refs), which could otherwise hold the maximum. T5 and EnCodec are left out (the plan
    adds them as a constant). Linux only."""
    spec = None if s.lora is None else s.lora.__dict__
    job = json.dumps({"lm": s.lm.__dict__, "batch": s.batch, "C": s.context_frames, "T": s.target_frames,
                      "lora": spec, "checkpoint": s.checkpoint, "steps": steps})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _MEASURE, job], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return int(r.stdout.split()[-1])


_MEASURE = r"""
import json, resource, sys
import torch
from stage_min.model import LMConfig, MusicGenLM
from stage_min.stage import StageLoss, build_sequence
from stage_min.train.lora import LoraSpec, add_adapters

job = json.loads(sys.argv[1])
torch.manual_seed(0)
def batch(cfg, B, C, T):
    seq = build_sequence(torch.randint(0, cfg.card, (B, cfg.n_codebooks, C)), torch.randint(0, cfg.card, (B, cfg.n_codebooks, T)),
                         T, cfg.special_id, cfg.context_id, torch.full((B,), C), torch.zeros(B, dtype=torch.bool))
    return seq, torch.randn(B, 12, cfg.text_dim), torch.ones(B, 12, dtype=torch.bool)
def step(lm, opt, data):
    seq, states, mask = data
    StageLoss(lm)(seq.grid, seq.keep, seq.target, states, mask).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
small = MusicGenLM(LMConfig(dim=32, n_layers=1, n_heads=2, card=16, n_special=2, text_dim=job["lm"]["text_dim"]))
step(small, torch.optim.AdamW(small.parameters()), batch(small.cfg, 1, 4, 4))  # load kernels, thread pools
cfg = LMConfig(**job["lm"])
data = batch(cfg, job["batch"], job["C"], job["T"])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
base = rss()
try:  # reset the peak (VmHWM) so that imports and the warm-up do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
with torch.device("meta"):
    lm = MusicGenLM(cfg)
lm = lm.to_empty(device="cpu")
for p in lm.parameters():
    torch.nn.init.normal_(p, std=0.02)
if job["lora"]:
    lm = add_adapters(lm, LoraSpec(**{**job["lora"], "targets": tuple(job["lora"]["targets"])}))
lm.checkpoint_blocks = job["checkpoint"]
lm.train()
opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-5, foreach=False)
for _ in range(job["steps"]):
    step(lm, opt, data)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(hwm - base)
"""
