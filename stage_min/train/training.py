"""Training helpers for train.py: config, model setup, batches, loss, evaluation, checkpoints.

train.py keeps the loop itself readable; what is here is the machinery around it.
"""
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError

from . import lora
from .options import PROBABILITY, SEED, Rule, above, at_least, check_options, one_of, option, within
from .data import DataConfig, Example, context_frames, encode_autocast, load_stem
from ..io.loading import (LATEST, MAX_ABS_WEIGHT, LoadError, follow_latest, is_native, lm_config_from_native, read_config,
                          read_state_dict, safe_torch_load, save_native, with_default_mode, write_atomic)
from ..io.metronome import click_track
from ..model import LMConfig, MusicGenLM
from ..songs import encode_contexts
from ..stage import StageLoss, build_sequence

STATE_FILE = "train_state.pt"  # optimizer, step and RNG states, beside the model files
METRICS_FILE = "metrics.jsonl"


class UsageError(Exception):
    """A bad option or a run folder that does not fit the options; the message says which."""


class Diverged(Exception):
    """The loss, the gradients or the weights became NaN, infinite or absurdly large; nothing is saved
    over the last good checkpoint."""


class SaveError(OSError):
    """A checkpoint could not be written (a full disk: torch.save's RuntimeError, an OSError); the
    last checkpoint is kept. An OSError, so that train.py's one-line error handling covers it."""


CLIP_MODES, PRECISIONS, SEPARATOR_INITS = ("value", "norm"), ("fp16", "bf16", "fp32"), ("kaiming", "mean")
PRESETS = ("tiny", "small", "medium", "large")
OPTIMIZERS = ("adamw", "adamw8bit")
TARGET_LIST = Rule(lambda v: bool(names(v)) and set(names(v)) <= set(lora.TARGETS), f"must be a comma list of {', '.join(lora.TARGETS)}")


def names(text: str) -> tuple:
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
DEVICE = Rule(lambda v: re.fullmatch(r"(cpu|cuda(:\d+)?)?", v) is not None, "must be cpu, cuda or cuda:N")


@dataclass
class TrainConfig:
    """train.py's options: each field's default is the original STAGE recipe (docs/training.md), its help
    says why one would change it, its rule what a value must be (options.py builds the parser from them)."""
    data: str = ""  # train.py --data, --out and --target are required, so they are written in its parser
    out: str = ""
    preset: str = option("small", "tiny (random, CPU-sized) or small, medium, large (the pretrained base's LM: "
                         "facebook/musicgen-small, -medium, -large by default)", one_of(*PRESETS), choices=PRESETS)
    base: str = option("", "model folder or hub id for T5, EnCodec (and the LM of small/medium/large); "
                       "(default: facebook/musicgen-PRESET; tiny: facebook/musicgen-small)")
    max_steps: int = option(10000, "optimizer steps (the original: up to 100k, 24 h cap)", at_least(1))
    batch_size: int = option(8, "global batch per optimizer step, split over processes (the original: 2 x 4 accumulation)", at_least(1))
    grad_accum: int = option(1, "micro-batches per step, to fit the batch in memory", at_least(1))
    lr: float = option(1e-5, "AdamW learning rate, constant (the original's); a from-scratch toy wants ~1e-3", above(0))
    cooldown_steps: int = option(0, "the last N of --max-steps run at --cooldown-lr (a constant lr swings a small model's "
                                 "behaviour from checkpoint to checkpoint; a lower one at the end settles it, stage_min.toy)")
    cooldown_lr: float = option(0.0, "learning rate of the cooldown steps")
    beta1: float = option(0.9, "AdamW beta1", within(0, 1, closed=False))
    beta2: float = option(0.95, "AdamW beta2", within(0, 1, closed=False))
    weight_decay: float = option(1e-3, "AdamW weight decay (on every parameter, see --no-decay-1d)", at_least(0))
    clip: float = option(1.0, "gradient clipping threshold (per value, or global norm with --clip-mode norm)", above(0))
    clip_mode: str = option("value", "value: each gradient value clipped to [-clip, clip] (the original's); norm: the "
                            "global gradient norm, which keeps the update's direction", one_of(*CLIP_MODES), choices=CLIP_MODES)
    precision: str = option("fp16", "CUDA: fp16 autocast with a gradient scaler (the original's), bf16 (no scaler, no "
                            "overflow; Ampere and newer) or fp32; CPU runs fp32", one_of(*PRECISIONS), choices=PRECISIONS)
    decay_all: bool = option(True, "no weight decay on biases and norms (GPT practice); the original decays every "
                             "parameter", flag="--no-decay-1d")
    valid_steps_only: bool = option(True, "also take the loss on the last k frames of codebook k, which the original "
                                    "leaves out (keep_only_valid_steps)", flag="--loss-all-steps")
    zero_special_row: bool = option(True, "new LMs: keep the start/gap token's embedding trainable (MusicGen's) instead "
                                    "of zeroed and frozen (the original's padding_idx)", flag="--train-special-row")
    attend_start_step: bool = option(False, "new LMs: let steps attend to the start step, as MusicGen does; the original masks it")
    separator_init: str = option("kaiming", "new separator row: kaiming normal (the original's) or mean of the code rows "
                                 "(an in-distribution vector for the pretrained layers on the first steps)",
                                 one_of(*SEPARATOR_INITS), choices=SEPARATOR_INITS)
    p_text_drop: float = option(0.5, "whole prompt dropped (null text), as the original", PROBABILITY)
    p_context_drop: float = option(0.1, "whole context dropped (build_sequence's drop_context)", PROBABILITY)
    p_word_drop: float = option(0.3, "T5 word dropout on kept prompts (MusicGen's and STAGE's 0.3)", PROBABILITY)
    eval_every: int = option(200, "steps between held-out evaluations", at_least(1))
    eval_windows: int = option(32, "held-out windows (fixed, not augmented)", at_least(1))
    save_every: int = option(500, "steps between checkpoints", at_least(1))
    log_every: int = option(10, "steps between metrics.jsonl lines", at_least(1))
    seed: int = option(0, "seed of every draw", SEED)
    device: str = option("", "cuda or cpu (default: cuda when available)", DEVICE)
    cache_dir: str = option("", "where per-song peaks and beats are cached (default: DATA/.stage_min_cache)")
    code_cache: bool = option(False, "encode each song's stems once, whole, and cut the windows from those codes: about "
                              "2x faster steps on a CPU, where encoding every window is half a step; needs --no-augment; "
                              "a few %% of codes near window edges differ from per-window encoding (what the original and "
                              "inference do; docs/training.md)")
    align_init: bool = option(False, "tiny preset: start layer 0's first head attending from target frame t to context "
                              "frame t (by position; needs one context length) with code embeddings of std 0.3: a "
                              "from-scratch toy does not find that offset by itself in CPU time (stage_min.toy, docs/training.md)")
    dim: int = option(0, "tiny preset: model width (0 = preset)", at_least(0))
    layers: int = option(0, "tiny preset: layers (0 = preset)", at_least(0))
    heads: int = option(0, "tiny preset: heads (0 = preset)", at_least(0))
    lora_rank: int = option(0, "train LoRA adapters of this rank (and the context-token rows) instead of the whole LM; "
                            "the run folder then stores the adapters only (0: full fine-tuning)", at_least(0))
    lora_alpha: float = option(0.0, "LoRA alpha: the update is scaled by alpha / rank (0: 2 x rank; the original's code sets no default)", at_least(0))
    lora_dropout: float = option(0.0, "dropout on the adapters' input (loralib's default)", within(0, 1, closed=False))
    lora_targets: str = option("q,k,v,out", "comma list of q, k, v, out (every self- and cross-attention's; the "
                               "original's choice) and ffn (both feed-forward layers)", TARGET_LIST)
    optimizer: str = option("adamw", "adamw (fp32 states, fused on CUDA) or adamw8bit (bitsandbytes' 8-bit AdamW: "
                            "2 bytes of state per trained parameter instead of 8; pip install 'stage_min[bnb]')",
                            one_of(*OPTIMIZERS), choices=OPTIMIZERS)
    checkpoint_activations: bool = option(False, "recompute each block's activations in the backward (torch.utils."
                                          "checkpoint): activation memory of about one block instead of all, for one more forward per step")
    fsdp: bool = option(False, "under torchrun: shard the LM's parameters, gradients and optimizer states over the "
                        "processes (FSDP2) instead of DDP's whole replica per process; resume with as many processes")
    plan: bool = option(False, "print the memory plan of these options (parameters, gradients, optimizer states, "
                        "activations; the largest batch that fits --gpu-memory) and exit without training")
    gpu_memory: float = option(24.0, "--plan: GiB of GPU memory to fit", above(0))
    plan_processes: int = option(1, "--plan with --fsdp: the processes (GPUs) the model is sharded over", at_least(1))
    data_cfg: DataConfig = field(default_factory=DataConfig)

    def check(self):
        """Each option's rule, then what ties options together."""
        try:
            check_options(self)
            check_options(self.data_cfg)
            self.data_cfg.check()
        except ValueError as e:
            raise UsageError(str(e)) from None
        if not 0 <= self.cooldown_steps <= self.max_steps:
            raise UsageError(f"--cooldown-steps must be in [0, --max-steps = {self.max_steps}], got {self.cooldown_steps}")
        if self.cooldown_steps and not self.cooldown_lr > 0:
            raise UsageError(f"--cooldown-steps needs --cooldown-lr > 0, got {self.cooldown_lr:g}")
        if self.preset != "tiny" and (self.dim or self.layers or self.heads):
            raise UsageError(f"--dim/--layers/--heads only apply to --preset tiny ({self.preset} keeps the base's shape)")
        if self.optimizer == "adamw8bit" and self.fsdp:
            raise UsageError("--optimizer adamw8bit does not take --fsdp (bitsandbytes' states are not sharded tensors); use adamw")
        if self.lora_rank and self.preset == "tiny":
            raise UsageError("--lora-rank adapts a pretrained LM: use --preset small, medium or large (tiny starts from random weights)")
        d = self.data_cfg
        if self.align_init and (self.preset != "tiny" or d.context_min != d.context_max
                                or (d.p_full_context > 0 and d.context_max != d.target_seconds)):
            raise UsageError("--align-init needs --preset tiny and one context length (--context-min = --context-max, "
                             "and --p-full-context 0 unless that length is the window): the head it sets looks a fixed "
                             "number of steps back")
        if self.code_cache and d.augment:
            raise UsageError("--code-cache needs --no-augment: a stretched or shifted window has no whole-song codes")
        if self.code_cache and d.encode_precision != "fp32":
            raise UsageError("--code-cache encodes whole songs once, in fp32: not with --encode-precision fp16")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): --lr, then --cooldown-lr for the last
        --cooldown-steps steps."""
        return self.cooldown_lr if step >= self.max_steps - self.cooldown_steps else self.lr

    def identity(self) -> dict:
        """What a resumed run must share with the checkpoint it continues."""
        # seed and val_fraction decide which songs are held out: changing them would leak eval songs into training
        same = {"preset": self.preset, "target": self.data_cfg.target, "dim": self.dim, "layers": self.layers,
                "heads": self.heads, "seed": self.seed, "val_fraction": self.data_cfg.val_fraction}
        if self.lora_rank:  # only then: runs saved before LoRA existed still resume
            same.update(lora_rank=self.lora_rank, lora_alpha=self.lora_spec().alpha, lora_targets=list(self.lora_spec().targets))
        return same

    def base_name(self) -> str:
        """--base, or the preset's MusicGen on the hub."""
        return self.base or f"facebook/musicgen-{'small' if self.preset == 'tiny' else self.preset}"

    def lora_spec(self) -> "lora.LoraSpec | None":
        if not self.lora_rank:
            return None
        return lora.LoraSpec(self.lora_rank, self.lora_alpha or 2.0 * self.lora_rank, self.lora_dropout, names(self.lora_targets))

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("exclude", "context_stems"):
            d["data_cfg"][k] = list(d["data_cfg"][k]) if d["data_cfg"][k] is not None else None
        return d



# ---- model --------------------------------------------------------------------------------------
def load_base(base: str):
    """T5 text encoder and EnCodec from a base model in any layout formats.py reads."""
    from ..io.formats import read_checkpoint
    from ..io.pretrained import load_codec, load_text_encoder

    ckpt = read_checkpoint(base)
    return load_text_encoder(ckpt.spiece_dir, ckpt.config, ckpt.state), load_codec(ckpt.config, ckpt.state)


def init_weights(lm: MusicGenLM, std: float = 0.02):
    """GPT-style init for the from-scratch `tiny` LM: small normal weights, zero biases, unit norms."""
    for m in lm.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def init_aligned(lm: MusicGenLM, offset: int, embed_std: float = 0.3, gain: float = 4.0, n_freqs: int = 16):
    """--align-init for a from-scratch toy: PyTorch's default init, code embeddings of std `embed_std`
    (positions then weigh as much as codes), and head 0 of layer 0 set to attend `offset` steps back by
    position alone: from target frame t to context frame t, which a fixed-length context puts a fixed
    number of steps back. A from-scratch LM does not find that offset through MusicGen's sinusoidal
    positions in CPU time (docs/training.md measures it); a pretrained MusicGen already attends by
    relative position. Only the start: every weight is trained as usual.

    How: sinusoidal_positions(p) holds (cos wp, sin wp) pairs; the head's queries read n_freqs of those
    pairs, its keys read them rotated by w * offset, so q(p) . k(j) = gain * sum cos(w (p - offset - j)),
    largest at j = p - offset."""
    cfg = lm.cfg
    d, hd, half = cfg.dim, cfg.head_dim, cfg.dim // 2
    with torch.no_grad():
        for emb in lm.embed:
            nn.init.normal_(emb.weight, std=embed_std)
        n = min(n_freqs, hd // 2)
        rows = torch.linspace(0, half // 2, n).round().long()  # a spread from the highest frequency down
        w = torch.exp(rows.float() * (-math.log(10000.0) / (half - 1))) * offset
        q, k = torch.zeros(hd, d), torch.zeros(hd, d)
        for j, (i, c, s) in enumerate(zip(rows.tolist(), torch.cos(w), torch.sin(w))):
            q[2 * j, i], q[2 * j + 1, half + i] = 1.0, 1.0
            k[2 * j, i], k[2 * j, half + i] = c, -s  # (cos w(p+o), sin w(p+o)) from (cos wp, sin wp)
            k[2 * j + 1, i], k[2 * j + 1, half + i] = s, c
        qkv = lm.layers[0].self_attn.qkv.weight
        qkv[:hd], qkv[d:d + hd] = q * math.sqrt(gain), k * math.sqrt(gain)


def build_model(cfg: TrainConfig):
    """-> (MusicGen pipeline with a STAGE LM, base string to record in checkpoints). The new LM is
    set up as the original's (docs/original.md#model) unless the config says otherwise: special row zeroed
    and frozen, start step masked, separator row Kaiming-normal."""
    from ..pipeline import MusicGen
    from ..io.pretrained import from_pretrained

    torch.manual_seed(cfg.seed)
    base = cfg.base_name()
    base = str(Path(base).resolve()) if Path(base).expanduser().is_dir() else base
    if cfg.preset != "tiny":  # the base's LM weights, with the context token appended
        model = from_pretrained(base, stage=True)
        lm_cfg, state = model.lm.cfg, model.lm.state_dict()
    else:
        text_encoder, codec = load_base(base)
        overrides = {k: v for k, v in (("dim", cfg.dim), ("n_layers", cfg.layers), ("n_heads", cfg.heads)) if v}
        lm_cfg = LMConfig.preset("tiny", text_dim=text_encoder.dim, n_special=2, card=codec.card,
                                 n_codebooks=codec.n_codebooks, **overrides)
        lm = MusicGenLM(lm_cfg)
        if cfg.align_init:
            # the context's one length (check() made sure), in frames as StemWindows draws it, + the separator
            n_context = context_frames(cfg.data_cfg.context_min, codec.frame_rate,
                                       int(round(cfg.data_cfg.target_seconds * codec.frame_rate)))
            init_aligned(lm, offset=n_context + 1)
        else:
            init_weights(lm)
        model, state = MusicGen(lm, text_encoder, codec).eval(), lm.state_dict()
    lm_cfg = replace(lm_cfg, zero_special_row=cfg.zero_special_row, attend_start_step=cfg.attend_start_step)
    state = dict(state)
    for k in range(lm_cfg.n_codebooks):
        table = state[f"embed.{k}.weight"].clone()
        if cfg.separator_init == "kaiming":  # as the original: a fresh row, nn.init.kaiming_normal_ on (1, dim)
            nn.init.kaiming_normal_(table[lm_cfg.context_id:lm_cfg.context_id + 1])
        else:
            table[lm_cfg.context_id] = table[:lm_cfg.card].mean(0)
        if lm_cfg.zero_special_row:
            table[lm_cfg.special_id] = 0
        state[f"embed.{k}.weight"] = table
    lm = MusicGenLM(lm_cfg)
    lm.load_state_dict(state)
    model.lm = lora.add_adapters(lm, cfg.lora_spec()) if cfg.lora_rank else lm
    return model.eval(), base


def validation_windows(val_songs: list, val_data: list, cfg: TrainConfig, codec, stats=None) -> list:
    """The fixed held-out windows, or [] with a warning saying why validation is off."""
    import sys

    from .data import DataError, StemWindows

    if not val_songs:
        return []
    try:
        # held-out windows as the songs are, and as at inference: never a copy of the target
        val_cfg = replace(cfg.data_cfg, augment=False, p_copy_context=0.0)
        val = StemWindows(val_data, val_cfg, codec.frame_rate, codec.sample_rate, stats)
        return [val.draw(np.random.default_rng([cfg.seed, 2**31, i])) for i in range(cfg.eval_windows)]
    except DataError as e:
        print(f"warning: validation is off: none of the {len(val_songs)} held-out song(s) is usable ({e})", file=sys.stderr)
        return []


def freeze_for_training(model):
    """EnCodec and T5 frozen; the whole LM, text projection included, trained."""
    for p in model.text_encoder.parameters():
        p.requires_grad_(False)
    for p in model.codec.parameters():
        p.requires_grad_(False)
    model.lm.train()


class StopFlag:
    """Ctrl-C sets `requested` instead of raising, so that training stops between two optimizer
    steps (a checkpoint never holds a half-applied update). A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


def make_optimizer(lm: MusicGenLM, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    # The original decays every parameter; decay_all=False spares norms and biases (1-D tensors), GPT-style.
    decay = [p for p in lm.parameters() if p.requires_grad and (cfg.decay_all or p.dim() >= 2)]
    no_decay = [p for p in lm.parameters() if p.requires_grad and not (cfg.decay_all or p.dim() >= 2)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw8bit":  # block-wise 8-bit moments (tensors under 4096 values keep fp32 ones)
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--optimizer adamw8bit needs bitsandbytes: pip install 'stage_min[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def clip_gradients(lm: MusicGenLM, cfg: TrainConfig) -> torch.Tensor:
    """Clip per value (the original's) or by the global norm; returns the global norm before
    clipping, whose finiteness tells a diverged (or, with fp16, overflowed) step."""
    grads = [p.grad for p in lm.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # --fsdp: a DTensor of partial norms, summed over the shards
        norm = norm.full_tensor()
    if cfg.clip_mode == "norm":
        torch.nn.utils.clip_grads_with_norm_(lm.parameters(), cfg.clip, norm)
    else:
        torch.nn.utils.clip_grad_value_(lm.parameters(), cfg.clip)
    return norm


# ---- batches ------------------------------------------------------------------------------------
@torch.no_grad()
def text_inputs(text_encoder, captions: list, drop: list, device, dtype=torch.float32):
    """T5 states (B, L, text_dim) and mask (B, L). A dropped or empty caption is the null
    condition: an all-false mask (and zero states after the projection)."""
    states, mask = text_encoder(["" if d else c for c, d in zip(captions, drop)])
    return states.to(device, dtype), mask.to(device)


@torch.no_grad()
def encode_targets(codec, audios: list, device) -> torch.Tensor:
    """Target windows (equal lengths, whole frames) -> codes (B, K, T). Each window is encoded by
    itself, as in the original and at inference (EnCodec's LSTM sees only the window, not the song
    before it); equal lengths need no padding, so the rows go through as one batch."""
    x = torch.from_numpy(np.stack(audios)).to(device)[:, None]
    return codec.encode(x)[..., : audios[0].shape[0] // codec.hop].long()


class SongCodes:
    """--code-cache: each song's target stem, each context mix drawn and its click track are encoded once,
    whole, and a window's codes are cut from them. On a CPU, where encoding every window is about half of a
    training step, steps get about twice as fast. The price: the codes of a window cut from a whole song
    differ from those of the window encoded alone (what inference sees) near its edges, where EnCodec's
    convolutions and LSTM hear the audio around it (docs/training.md measures how many). Kept in memory,
    one int16 array per (song, stems) pair that was drawn; no augmentation (a stretched window has no
    whole-song codes)."""

    def __init__(self, songs: list, codec, device):
        self.songs = {sd.song.name: sd for sd in songs}
        self.codec, self.device, self.codes = codec, device, {}

    @torch.no_grad()
    def window(self, song: str, stems: tuple, start: int, n: int) -> torch.Tensor:
        """Codes (K, n) of frames [start, start + n) of the sum of `stems` (() = the click track)."""
        if (song, stems) not in self.codes:
            sd, hop, sr = self.songs[song], self.codec.hop, self.codec.sample_rate
            audio = np.zeros(sd.n_frames * hop, dtype=np.float32)
            if stems:
                for s in stems:
                    x = load_stem(sd.song.stems[s], sr)[: len(audio)]
                    audio[: len(x)] += x
            else:
                audio = click_track(sd.beats, len(audio) / sr, sample_rate=sr, downbeats=sd.downbeats)[: len(audio)]
            x = torch.from_numpy(np.ascontiguousarray(audio)).to(self.device)[None, None]
            self.codes[(song, stems)] = self.codec.encode(x)[0, :, : sd.n_frames].to(torch.int16).cpu()
        return self.codes[(song, stems)][:, start:start + n].long().to(self.device)


def make_batch(model, examples: list[Example], drop_text: list, drop_context: list, device,
               song_codes: SongCodes | None = None, encode_precision: str = "fp32") -> dict:
    lm_cfg = model.lm.cfg
    if song_codes is None:
        with encode_autocast(device, encode_precision):  # DataConfig.encode_precision
            context, lengths = encode_contexts(model.codec, [e.context for e in examples], lm_cfg.special_id, device)
            target = encode_targets(model.codec, [e.target for e in examples], device)
    else:
        hop, target_stem = model.codec.hop, song_codes.songs[examples[0].song].target
        target = torch.stack([song_codes.window(e.song, (target_stem,), e.start, len(e.target) // hop) for e in examples])
        lengths = torch.tensor([len(e.context) // hop for e in examples], device=device)
        context = torch.full((len(examples), lm_cfg.n_codebooks, int(lengths.max())), lm_cfg.special_id, dtype=torch.long, device=device)
        for i, e in enumerate(examples):  # right-aligned, as encode_contexts gives them
            stems = () if e.metronome else tuple(e.context_stems)
            context[i, :, context.shape[-1] - int(lengths[i]):] = song_codes.window(e.song, stems, e.start, int(lengths[i]))
    seq = build_sequence(context, target, target.shape[-1], lm_cfg.special_id, lm_cfg.context_id, lengths,
                         torch.tensor(drop_context, device=device))
    states, mask = text_inputs(model.text_encoder, [e.caption for e in examples], drop_text, device)
    return {"grid": seq.grid, "keep": seq.keep, "target": seq.target, "states": states, "mask": mask,
            "context": context, "lengths": lengths, "codes": target}


def drop_words(caption: str, p: float, rng: np.random.Generator) -> str:
    """Word dropout on a prompt: each whitespace-separated word is removed with probability p."""
    return " ".join(w for w in caption.split() if rng.random() >= p)


def draw_examples(windows, cfg: TrainConfig, step: int, micro: int, indices) -> tuple[list, list, list]:
    """The examples of one micro-batch. Sample i of (step, micro) always comes from the same seed,
    whichever process draws it: one process with batch 2B sees exactly what two with B see."""
    examples, drop_text, drop_context = [], [], []
    for i in indices:
        rng = np.random.default_rng([cfg.seed, step, micro, i])
        example = windows.draw(rng)
        if cfg.p_word_drop and example.caption:  # its own generator: the other draws stay as they were
            words = np.random.default_rng([cfg.seed, step, micro, i, 1])
            example = replace(example, caption=drop_words(example.caption, cfg.p_word_drop, words))
        examples.append(example)
        drop_text.append(bool(rng.random() < cfg.p_text_drop))
        drop_context.append(bool(rng.random() < cfg.p_context_drop))
    return examples, drop_text, drop_context


# ---- loss ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(lm: MusicGenLM, batches: list[dict], autocast, valid_only: bool = True, loss_fn=None) -> dict:
    """Target-frame loss on held-out windows, with the real context and with the context dropped:
    the gap between the two is what the context is worth to the model."""
    was_training = lm.training
    lm.eval()
    loss_fn = loss_fn or StageLoss(lm, valid_only)  # --fsdp passes its sharded root (a StageLoss)
    totals = {"val_loss": 0.0, "val_loss_nocontext": 0.0}
    lm_cfg = lm.cfg
    n_windows = 0
    for b in batches:
        B = b["codes"].shape[0]
        n_windows += B
        for name, drop in (("val_loss", False), ("val_loss_nocontext", True)):
            seq = build_sequence(b["context"], b["codes"], b["codes"].shape[-1], lm_cfg.special_id, lm_cfg.context_id,
                                 b["lengths"], torch.full((B,), drop, device=b["codes"].device))
            with autocast():  # weighted by the batch's windows: a smaller last batch counts for less
                totals[name] += B * float(loss_fn(seq.grid, seq.keep, seq.target, b["states"], b["mask"]))
    lm.train(was_training)
    return {k: v / max(1, n_windows) for k, v in totals.items()}


# ---- checkpoints --------------------------------------------------------------------------------
# A run folder holds one checkpoint as a unit: step-N/ (config.json, model.safetensors, train_state.pt),
# written complete under a temporary name (.step-N.XXXX), renamed, and only then named by the pointer
# file `latest` (replaced atomically). The previous step folder is deleted after that, so a kill at any
# moment leaves the last complete checkpoint in place; leftovers are removed by the next start.
# train_state.pt holds tensors and plain values only (loaded with weights_only=True).
STEP_DIR = re.compile(r"step-(\d+)")


def rng_state() -> dict:
    """Every RNG state as tensors and plain numbers: nothing that needs unpickling."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # else a run saved before step folders: numpy's own tuple
    if isinstance(p, dict):
        p = (p["version"], tuple(int(w) for w in p["words"]), p["gauss_next"])
    random.setstate(p)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(out: Path) -> Path | None:
    """The step folder the run's `latest` pointer names (None: no checkpoint yet). A run written
    before step folders existed is its own checkpoint folder."""
    out = Path(out)
    if (out / LATEST).is_file():
        return follow_latest(out)
    if (out / "config.json").exists() or (out / STATE_FILE).exists():
        return out
    return None


def scaler_state(scaler) -> dict | None:
    """fp16's GradScaler state (the loss scale it has settled on) as plain numbers, so that
    train_state.pt loads with weights_only; None when no scaler is in use."""
    if scaler is None or not scaler.is_enabled():
        return None
    return {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}


def checkpoint_problem(lm_state: dict, loss: float | None, card: int) -> str | None:
    """Why these weights must not replace the last good checkpoint, or None when they are fit to:
    every weight finite and within +-MAX_ABS_WEIGHT (a diverging run, e.g. --lr 1e30, gives finite
    but ruined weights of 1e30), and the last step's training loss (when given) finite and not
    exploding: at most 3 x ln(card), three times the loss of guessing uniformly. The loss was measured
    before the step's update, the weights after it: the two checks together cover the step."""
    for k, v in lm_state.items():
        if not v.is_floating_point():
            continue
        if not bool(torch.isfinite(v).all()):
            return f"weight {k} holds NaN or infinite values"
        top = float(v.abs().max()) if v.numel() else 0.0
        if top > MAX_ABS_WEIGHT:
            return f"weight {k} reaches |w| = {top:.3g}, above {MAX_ABS_WEIGHT:g} (the run is diverging)"
    if loss is not None:
        if not math.isfinite(loss):
            return f"the training loss is {loss:g}"
        if loss > 3 * math.log(card):
            return f"the training loss ({loss:.3g}) is exploding (above 3 x ln({card}) = {3 * math.log(card):.3g})"
    return None


def save_checkpoint(out: Path, lm: MusicGenLM, base: str, step: int, cfg: TrainConfig, optimizer, scaler=None,
                    loss: float | None = None):
    """Write step-N/ complete under a temporary name, rename it, switch `latest` to it, then delete
    the checkpoint it replaces. Keep-last-good: the new weights (and the last step's loss, when given)
    are checked first (checkpoint_problem); a ruined model is never saved and the last good checkpoint
    is never deleted for it (Diverged says which one is kept). A failed write (a full disk) raises
    SaveError and also keeps the last checkpoint. train_state.pt holds the optimizer, RNG and (fp16)
    loss-scaler states, tensors and numbers only."""
    out = Path(out)
    lm_state = lora.adapter_state(lm) if cfg.lora_rank else lm.state_dict()  # LoRA: a few MB, not the whole LM
    previous = latest_checkpoint(out)
    kept = kept_message(out, previous)
    problem = checkpoint_problem(lm_state, loss, lm.cfg.card)
    if problem is not None:
        raise Diverged(f"step {step}: {problem}; not saved: {kept} (try a lower --lr)")
    name = f"step-{step:08d}"
    if previous is not None and previous.name == name:
        return  # this very step is already saved (a Ctrl-C right after a scheduled save)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "identity": cfg.identity()}
    if (scaled := scaler_state(scaler)) is not None:
        state["scaler"] = scaled
    try:
        write_step(out, name, Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out)), state, lm_state, lm.cfg, base, cfg, loss)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError, safetensors as its own
        text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0]
        raise SaveError(f"cannot save the checkpoint of step {step} in {out} ({text}; is the disk full?); {kept}") from None
    remove_stale(out)


def kept_message(out: Path, previous: Path | None) -> str:
    """What a refused or failed save leaves: said in its error."""
    if previous is None:
        return f"no checkpoint was saved in {out} yet"
    return f"the last good checkpoint{'' if previous == out else ' ' + previous.name} in {out} is kept"


def write_step(out: Path, name: str, tmp: Path, state: dict, lm_state: dict, lm_cfg, base: str, cfg: TrainConfig,
               loss: float | None = None):
    """Fill the temporary folder tmp (other ranks' files may be in it already), rename it to step-N, switch `latest`."""
    try:
        torch.save(state, tmp / STATE_FILE)
        spec = {"lora": {k: v for k, v in vars(cfg.lora_spec()).items()}} if cfg.lora_rank else {}
        loss_record = {} if loss is None else {"train_loss": float(loss)}
        save_native(tmp, lm_state, lm_cfg, base, extra={"step": state["step"], "train": cfg.to_json(), **spec, **loss_record})
        for f in tmp.iterdir():
            _fsync(f)
        with_default_mode(tmp)
        if (out / name).exists():  # a complete folder of a run killed before its pointer switch
            shutil.rmtree(out / name)
        os.rename(tmp, out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(out / LATEST, lambda p: p.write_text(name + "\n"))


def save_sharded(out: Path, lm: MusicGenLM, base: str, step: int, cfg: TrainConfig, optimizer, scaler=None,
                 loss: float | None = None):
    """--fsdp: every rank calls it. The model gathered to rank 0 and written whole; each rank's optimizer
    shard in its own file of the same temporary step folder, renamed by rank 0 once all are written."""
    import torch.distributed as dist

    from . import sharding

    out, rank = Path(out), dist.get_rank()
    full = sharding.full_state(lm)  # collective
    bad = torch.tensor([float(not all(bool(torch.isfinite(p.to_local()).all()) for p in lm.parameters()))])
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise Diverged(f"step {step}: the weights hold NaN or infinite values; not saved (the last good checkpoint in {out} is kept)")
    name = f"step-{step:08d}"
    if (previous := latest_checkpoint(out)) is not None and previous.name == name:
        return
    tmp = sharding.shared_temporary(out, name)
    mine = {"optimizer": sharding.local_optimizer_state(optimizer), "rng": rng_state()}
    if rank:
        torch.save(mine, tmp / sharding.rank_file(STATE_FILE, rank))
        _fsync(tmp / sharding.rank_file(STATE_FILE, rank))
    dist.barrier()  # every shard is on disk before rank 0 renames the folder
    if rank == 0:
        trained = {n for n, p in lm.named_parameters() if p.requires_grad}
        lm_state = {k: v for k, v in full.items() if k in trained} if cfg.lora_rank else full
        state = {"step": step, **mine, "identity": cfg.identity(), "sharded_over": dist.get_world_size()}
        if (scaled := scaler_state(scaler)) is not None:
            state["scaler"] = scaled
        write_step(out, name, tmp, state, lm_state, lm.cfg, base, cfg, loss)
        remove_stale(out)
    dist.barrier()


def rank_state(out: Path, state: dict, rank: int, world: int, fsdp: bool) -> dict:
    """The optimizer state this rank resumes from: its own shard under --fsdp (same process count)."""
    from .sharding import rank_file

    over = state.get("sharded_over")
    if fsdp and over != world or not fsdp and over:
        raise UsageError(f"--resume: the run in {out} was saved " + (f"sharded over {over} processes (--fsdp): resume it "
                         f"with --fsdp and {over} processes" if over else "without --fsdp: resume it without --fsdp"))
    if not over or rank == 0:
        return state
    try:
        return safe_torch_load(latest_checkpoint(out) / rank_file(STATE_FILE, rank))
    except LoadError as e:
        raise UsageError(f"--resume: {e}") from None


def check_out_not_data(out, data):
    """--out must not be --data or a folder inside it: run files would sit among the songs (and a
    folder inside --data would be read as a song)."""
    o, d = Path(os.path.realpath(out)), Path(os.path.realpath(data))
    if o == d or d in o.parents:
        raise UsageError(f"--out {out} is {'--data itself' if o == d else 'inside --data ' + str(data)}: the run's files "
                         "would be mixed with the songs; choose a folder outside the dataset")


class RunLock:
    """An exclusive lock on a run folder, held while one train.py uses it: a second run on the same
    --out stops at once instead of deleting the first one's temporary step as stale. A flock on the
    folder itself: no lock file to leave behind, and the kernel releases it when the process dies
    (kill -9 included)."""

    def __init__(self, out):
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise UsageError(f"--out {out}: cannot create or open it ({e.strerror or type(e).__name__})") from None
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise UsageError(f"--out {out} is in use by another train.py; wait for it to finish or choose another "
                             "--out") from None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_run(out) -> RunLock:
    """Lock a run folder (made if missing) for this process; UsageError if another process holds it."""
    return RunLock(out)


def remove_stale(out: Path):
    """Delete what a save leaves behind when it is killed: temporary folders and files, step folders
    the pointer does not name, and the files of the pre-step-folder layout once a step folder exists."""
    out = Path(out)
    keep = latest_checkpoint(out)
    for path in out.iterdir():
        stale = (path.name.startswith(".step-") or (path.name.startswith(".") and path.name.endswith(".tmp"))
                 or (STEP_DIR.fullmatch(path.name) and path.is_dir() and path != keep))
        if stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if keep is not None and keep != out:
        for old in ("config.json", "model.safetensors", STATE_FILE):
            (out / old).unlink(missing_ok=True)


def has_checkpoint(out: Path) -> bool:
    return (Path(out) / LATEST).exists() or (Path(out) / "config.json").exists() or (Path(out) / STATE_FILE).exists()


def check_resumable(out: Path, cfg: TrainConfig) -> dict:
    """Read and check a run folder before anything is built; returns its train state."""
    try:
        ckpt = latest_checkpoint(out)
    except LoadError as e:
        raise UsageError(f"--resume: {e}") from None
    if ckpt is None or not (ckpt / "config.json").exists() or not (ckpt / STATE_FILE).exists():
        raise UsageError(f"--resume: {out} holds no checkpoint (a step folder with config.json and {STATE_FILE})")
    config = read_config(ckpt)
    if not is_native(config) or "step" not in config:
        raise UsageError(f"--resume: {ckpt}/config.json is not a train.py checkpoint")
    try:
        state = safe_torch_load(ckpt / STATE_FILE, legacy_numpy=ckpt == Path(out))
    except LoadError as e:
        raise UsageError(f"--resume: {e}") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "rng", "identity"} <= set(state):
        raise UsageError(f"--resume: {ckpt / STATE_FILE} is not a train.py state (written by an older version?)")
    if state.get("step") != config["step"]:
        raise UsageError(f"--resume: {ckpt} is inconsistent (model at step {config['step']}, optimizer at step "
                         f"{state.get('step')}); an interrupted save? resume from a copy of an earlier checkpoint")
    if ("lora" in config) != bool(cfg.lora_rank):
        raise UsageError(f"--resume: the run in {out} trained " + ("LoRA adapters: pass its --lora-rank" if "lora" in config
                                                                    else "the whole LM: leave --lora-rank out"))
    for k, v in cfg.identity().items():
        if state["identity"].get(k) != v:
            raise UsageError(f"--resume: the checkpoint in {out} was trained with {k}={state['identity'].get(k)!r}, not {v!r}")
    return state


def load_for_resume(out: Path, cfg: TrainConfig | None = None):
    """The pipeline from a run folder's latest checkpoint (T5 and EnCodec from the base it records) and that base.
    A LoRA run: the base's LM with new adapters, then the run's adapters and context rows loaded into them."""
    from ..io.pretrained import from_pretrained

    ckpt = latest_checkpoint(out)
    config = read_config(ckpt)
    if "lora" not in config:
        return from_pretrained(str(out)), config.get("base")
    lm_cfg = lm_config_from_native(config)
    model, base = build_model(replace(cfg, base=config["base"], zero_special_row=lm_cfg.zero_special_row,
                                      attend_start_step=lm_cfg.attend_start_step))
    adapters = {k[len("lm."):]: v for k, v in read_state_dict(ckpt).items()}
    missing, unexpected = model.lm.load_state_dict(adapters, strict=False)
    if unexpected or set(adapters) != set(lora.adapter_state(model.lm)):
        raise UsageError(f"--resume: the adapters in {ckpt} do not fit these LoRA options")
    return model, base


def log_metrics(out: Path, record: dict):
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
