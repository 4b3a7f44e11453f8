"""Fine-tune MusicGen into STAGE: generate one stem given a mixture (or a click track) as a prefix.

    python train.py --data DIR --target drums --preset small --out runs/drums [--base PATH_OR_HUB_ID]
                    [--max-steps N] [--resume] ...
    torchrun --nproc_per_node=N train.py ...          # DistributedDataParallel, same options

The run folder is the checkpoint: `python sample.py --model runs/drums ...` loads it.
"""
import contextlib
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from stage_min.train import data as D
from stage_min.train import training as T
from stage_min.io.audio import AudioError
from stage_min.train.beats import check_tracker
from stage_min.cli.options import OneLineParser, warnings_via_tqdm
from stage_min.io.loading import LoadError


# Defaults are the original STAGE recipe (REFERENCE.md section 8); each help says why one would change it.
HELP = {
    "max_steps": "optimizer steps (the original: up to 100k, 24 h cap)",
    "batch_size": "global batch per optimizer step (the original: 2 x 4 accumulation)",
    "grad_accum": "micro-batches per step, to fit the batch in memory",
    "eval_every": "steps between held-out evaluations", "eval_windows": "held-out windows (fixed, not augmented)",
    "save_every": "steps between checkpoints", "log_every": "steps between metrics.jsonl lines", "seed": "seed of every draw",
    "dim": "tiny preset: model width (0 = preset)", "layers": "tiny preset: layers (0 = preset)", "heads": "tiny preset: heads (0 = preset)",
    "lr": "AdamW learning rate, constant (the original's); a from-scratch toy wants ~1e-3",
    "cooldown_steps": "the last N of --max-steps run at --cooldown-lr (a constant lr swings a small model's "
                      "behaviour from checkpoint to checkpoint; a lower one at the end settles it, stage_min.toy)",
    "cooldown_lr": "learning rate of the cooldown steps",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "weight_decay": "AdamW weight decay (on every parameter, see --no-decay-1d)",
    "clip": "gradient clipping threshold (per value, or global norm with --clip-mode norm)",
    "p_text_drop": "whole prompt dropped (null text), as the original", "p_context_drop": "whole context dropped",
    "p_word_drop": "T5 word dropout on kept prompts",
    "target_seconds": "window length (the original: 10 s); shorter for CPU toys",
    "p_full_context": "the context is the whole window with this probability (the original: 0.05); "
                      "0 with --context-min = --context-max for a fixed context length",
    "context_min": "else a prefix of the window, uniform in [min, max] seconds", "context_max": "see --context-min",
    "context_step": "0: any whole number of frames (the original: any length); > 0: lengths on this grid, so that "
                    "contexts of equal length are encoded as one batch (faster, less varied)",
    "p_metronome": "context replaced by a click track on the song's beats",
    "p_copy_context": "context = the target stem itself (a copy task; the original: 0): a from-scratch toy learns "
                      "first where context frame t sits, then what to take from it (stage_min.toy)", "silence": "a stem whose peak over the window is below this is silent",
    "val_fraction": "held-out songs",
    "p_speed": "augmentation: chance of a speed change", "speed_min": "speed change: lowest Rubber Band time ratio "
               "(window duration / song segment duration; < 1 is faster), in (0, 4]", "speed_max": "speed change: highest time ratio",
    "p_pitch": "augmentation: chance of a pitch shift", "pitch_semitones": "pitch shift drawn in [-n, n] whole semitones",
}


def parse_args(argv=None) -> tuple[T.TrainConfig, bool]:
    c, d = T.TrainConfig(), D.DataConfig()
    p = OneLineParser(description=__doc__)
    p.add_argument("--data", required=True, help="stems dataset folder (one folder per song)")
    p.add_argument("--target", required=True, help="stem to generate: drums, bass, ...")
    p.add_argument("--out", required=True, help="run folder: checkpoint, metrics.jsonl")
    p.add_argument("--preset", default=c.preset, help="tiny (random, CPU-sized) or small (pretrained base LM)")
    p.add_argument("--base", default=c.base, help="model folder or hub id for T5, EnCodec (and the LM for small)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_windows", "save_every", "log_every", "seed",
                 "dim", "layers", "heads", "cooldown_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(c, name), help=HELP[name])
    for name in ("lr", "cooldown_lr", "beta1", "beta2", "weight_decay", "clip", "p_text_drop", "p_context_drop", "p_word_drop"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(c, name), help=HELP[name])
    for name in ("target_seconds", "p_full_context", "context_min", "context_max", "context_step", "p_metronome", "p_copy_context",
                 "silence", "val_fraction", "p_speed", "speed_min", "speed_max", "p_pitch"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name), help=HELP[name])
    p.add_argument("--pitch-semitones", type=int, default=d.pitch_semitones, help=HELP["pitch_semitones"])
    p.add_argument("--no-augment", action="store_true", help="no speed or pitch changes (the original augments; "
                   "off for a faster CPU run, or for data whose tempo and key must stay)")
    p.add_argument("--code-cache", action="store_true", help="encode each song's stems once, whole, and cut the "
                   "windows from those codes: about 2x faster steps on a CPU, where encoding every window is half a "
                   "step; needs --no-augment; a few %% of codes near window edges differ from per-window encoding "
                   "(what the original and inference do; docs/training.md)")
    p.add_argument("--context-stems", default=None, help=f"stems a context may use (comma list, the target left out), "
                   f"or 'all' (default: {','.join(d.context_stems)}: the original's set, which keeps vocals, percussion, "
                   f"wind and other_plucked out; other names for other datasets)")
    p.add_argument("--exclude", default=None, help="deprecated: any stem but these may be in a context "
                   "(same as --context-stems all minus these)")
    p.add_argument("--beat-tracker", default=d.beat_tracker, choices=D.TRACKERS, help="for songs without beats.txt: "
                   "librosa (offline; downbeats by a low-frequency rule) or beat_this (Beat This!, as the original's "
                   "beatthis.npz suggests; pip install beat-this, downloads its checkpoint once)")
    p.add_argument("--clip-mode", default=c.clip_mode, choices=T.CLIP_MODES, help="value: each gradient value clipped "
                   "to [-clip, clip] (the original's); norm: the global gradient norm, which keeps the update's direction")
    p.add_argument("--precision", default=c.precision, choices=T.PRECISIONS, help="CUDA: fp16 autocast with a "
                   "gradient scaler (the original's), bf16 (no scaler, no overflow; Ampere and newer) or fp32; CPU runs fp32")
    p.add_argument("--no-decay-1d", action="store_true", help="no weight decay on biases and norms (GPT practice); "
                   "the original decays every parameter")
    p.add_argument("--loss-all-steps", action="store_true", help="also take the loss on the last k frames of codebook k, "
                   "which the original leaves out (keep_only_valid_steps)")
    p.add_argument("--train-special-row", action="store_true", help="new LMs: keep the start/gap token's embedding "
                   "trainable (MusicGen's) instead of zeroed and frozen (the original's padding_idx)")
    p.add_argument("--attend-start-step", action="store_true", help="new LMs: let steps attend to the start step, as "
                   "MusicGen does; the original masks it")
    p.add_argument("--separator-init", default=c.separator_init, choices=T.SEPARATOR_INITS, help="new separator row: "
                   "kaiming normal (the original's) or mean of the code rows (an in-distribution vector for the "
                   "pretrained layers on the first steps)")
    p.add_argument("--align-init", action="store_true", help="tiny preset: start layer 0's first head attending from "
                   "target frame t to context frame t (by position; needs one context length) with code embeddings of std "
                   "0.3: a from-scratch toy does not find that offset by itself in CPU time (stage_min.toy, docs/training.md)")
    p.add_argument("--cache-dir", default="", help="where per-song peaks and beats are cached (default: DATA/.stage_min_cache)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    a = p.parse_args(argv)
    names = lambda text: tuple(x.strip().lower() for x in text.split(",") if x.strip())  # noqa: E731
    if a.exclude is not None and a.context_stems is not None:
        p.error("give --context-stems or the deprecated --exclude, not both")
    context_stems = a.context_stems if a.context_stems is not None else ",".join(d.context_stems)
    context_stems = None if a.exclude is not None or context_stems.strip().lower() == "all" else names(context_stems)
    data_cfg = D.DataConfig(target=a.target.lower(), context_stems=context_stems, exclude=names(a.exclude or ""),
                            augment=not a.no_augment, beat_tracker=a.beat_tracker, pitch_semitones=a.pitch_semitones,
                            **{k: getattr(a, k) for k in ("target_seconds", "p_full_context", "context_min", "context_max",
                                                          "context_step", "p_metronome", "p_copy_context", "silence",
                                                          "val_fraction", "p_speed", "speed_min", "speed_max", "p_pitch")})
    fields = {k: getattr(a, k) for k in T.TrainConfig.__dataclass_fields__ if k != "data_cfg" and hasattr(a, k)}
    fields.update(decay_all=not a.no_decay_1d, valid_steps_only=not a.loss_all_steps,
                  zero_special_row=not a.train_special_row)
    return T.TrainConfig(**fields, data_cfg=data_cfg), a.resume


def train(cfg: T.TrainConfig, resume: bool):
    cfg.check()
    rank, world, local_rank = T.distributed_env()
    master = rank == 0
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # its form: cfg.check()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise T.UsageError("--device cuda asked for, but no CUDA device is available")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        # rank 0 encodes and beat-tracks every song on a first run while the others wait at a barrier
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise T.UsageError(f"--batch-size {cfg.batch_size} is not divisible by processes x --grad-accum = {world * cfg.grad_accum}")
    micro_bs = cfg.batch_size // (world * cfg.grad_accum)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise T.UsageError(f"--out {out} is a file")
    if resume:
        state = T.check_resumable(out, cfg)
    elif T.has_checkpoint(out):
        raise T.UsageError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if master and out.is_dir():
        T.remove_stale(out)  # temporaries of a save that was killed
    songs = D.find_songs(cfg.data)  # before the (slow) model load: a bad --data fails fast
    cfg.data_cfg.check_stem_names(songs)
    if any(s.beats_file is None for s in songs):
        check_tracker(cfg.data_cfg.beat_tracker)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data) / ".stage_min_cache"
    for folder, flag in ((out, "--out"), (cache_dir, "--cache-dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise T.UsageError(f"{flag} {folder}: cannot create it ({e.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise T.UsageError(f"{flag} {folder} is not writable")
    train_songs, val_songs = D.split_songs(songs, cfg.data_cfg.val_fraction, cfg.seed)
    if not train_songs:
        raise T.UsageError(f"--val-fraction {cfg.data_cfg.val_fraction:g} holds out all {len(songs)} songs: none is left "
                           "to train on; lower it")

    # ---- model, optimizer --------------------------------------------------------------------
    if resume:
        model, base = T.load_for_resume(out)  # the base recorded in the run, not --base
    else:
        model, base = T.build_model(cfg)
    model = model.to(device)
    T.freeze_for_training(model)
    lm = model.lm
    optimizer = T.make_optimizer(lm, cfg, fused=device.type == "cuda")
    step = 0
    if resume:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise T.UsageError(f"--resume: the optimizer state in {out} does not fit this model ({e})") from None
        for group in optimizer.param_groups:  # the betas given now win over the saved ones (the lr is set every step)
            group["betas"] = (cfg.beta1, cfg.beta2)
        T.set_rng_state(state["rng"])
        step = state["step"]
    ddp = T.StageLoss(lm, cfg.valid_steps_only)
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(ddp, device_ids=[device.index] if device.type == "cuda" else None)
    # mixed precision on CUDA only (CPU runs fp32); fp16 needs a gradient scaler against underflow
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision) if device.type == "cuda" else None
    autocast = (lambda: torch.autocast("cuda", dtype=half)) if half is not None else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=half == torch.float16)
    if resume and "scaler" in state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])

    # ---- data: rank 0 fills the cache first, the others then read it -------------------------
    codec = model.codec
    stats = D.Stats()

    def prepare(song_list):
        out_list = []
        for s in tqdm(song_list, desc="reading songs (stem peaks, beats; cached)", unit="song",
                      disable=not master or len(song_list) < 2, leave=False):
            sd = D.prepare_song(s, cfg.data_cfg, codec, device, cache_dir, stats)
            if sd is not None:
                out_list.append(sd)
        return out_list

    if world > 1 and not master:
        dist.barrier()
    train_data, val_data = prepare(train_songs), prepare(val_songs)
    if world > 1 and master:
        dist.barrier()
    try:
        windows = D.StemWindows(train_data, cfg.data_cfg, codec.frame_rate, codec.sample_rate, stats)
    except D.DataError as e:
        held = f" ({len(val_songs)} of {len(songs)} songs are held out by --val-fraction {cfg.data_cfg.val_fraction:g})" if val_songs else ""
        raise D.DataError(f"no training songs left: {e}{held}") from None
    song_codes = T.SongCodes(windows.songs, codec, device) if cfg.code_cache else None
    eval_batches = []
    if master:  # fixed held-out windows, encoded once, each by itself (as at inference) even with --code-cache
        ex = T.validation_windows(val_songs, val_data, cfg, codec, stats)
        for i in range(0, len(ex), micro_bs):
            chunk = ex[i:i + micro_bs]
            eval_batches.append(T.make_batch(model, chunk, [False] * len(chunk), [False] * len(chunk), device))
    if master:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in lm.parameters())
        print(f"{len(windows.songs)} training songs, {len(val_data)} held out; {stats.summary()}; "
              f"LM {n_params / 1e6:.1f}M parameters; {world} process(es), {micro_bs} x {cfg.grad_accum} per process; "
              f"{cfg.precision if half is not None else 'fp32'}", file=sys.stderr)

    # ---- the loop ------------------------------------------------------------------------------
    def save():
        if master:
            T.save_checkpoint(out, lm, base, step, cfg, optimizer, scaler)

    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", disable=not master, dynamic_ncols=True)
    t0, frames = time.time(), 0
    stop = T.StopFlag()  # Ctrl-C lands between steps, never inside an optimizer update
    try:
        while step < cfg.max_steps:
            if stop.requested:
                raise KeyboardInterrupt
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                first = rank * micro_bs
                examples, drop_text, drop_ctx = T.draw_examples(windows, cfg, step, micro, range(first, first + micro_bs))
                b = T.make_batch(model, examples, drop_text, drop_ctx, device, song_codes)
                # DDP averages gradients on the last micro-batch only; no_sync() is single-use, one per micro-batch
                with contextlib.nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else ddp.no_sync():
                    with autocast():
                        loss = ddp(b["grid"], b["keep"], b["target"], b["states"], b["mask"]) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().item()
                frames += b["codes"].numel() // b["codes"].shape[1]
            if world > 1:  # log the global batch's loss, not rank 0's share of it
                total = torch.tensor([loss_sum], device=device)
                dist.all_reduce(total)
                loss_sum = total.item() / world
            scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
            grad_norm = T.clip_gradients(lm, cfg)
            # fp16: an overflow in the gradients is the scaler's to handle (it skips the step and lowers
            # the scale); a non-finite loss, or gradients without a scaler, mean divergence
            if not math.isfinite(loss_sum) or not (scaler.is_enabled() or bool(torch.isfinite(grad_norm))):
                raise T.Diverged(f"step {step + 1}: the loss ({loss_sum:g}) or the gradient norm ({float(grad_norm):g}) "
                                 f"is not finite; stopped without saving: the last checkpoint in {out} is kept "
                                 "(try a lower --lr)")  # same on every rank: all stop
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
                fps = frames * world / (time.time() - t0)
                bar.set_postfix(loss=f"{loss_sum:.3f}", frames_s=f"{fps:.0f}")
                T.log_metrics(out, {"step": step, "loss": loss_sum, "lr": cfg.lr_at(step - 1), "target_frames_per_s": fps})
                t0, frames = time.time(), 0
            if master and eval_batches and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                metrics = T.evaluate(lm, eval_batches, autocast, cfg.valid_steps_only)
                T.log_metrics(out, {"step": step, **metrics})
                bar.write(f"step {step}: val loss {metrics['val_loss']:.3f} (context dropped: {metrics['val_loss_nocontext']:.3f})")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save()
            bar.update(1)
        stop.restore()
    except KeyboardInterrupt:
        stop.restore()
        bar.close()
        save()
        if master:
            print(f"interrupted: checkpoint at step {step} in {out}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    except BaseException:  # e.g. T.Diverged: the error line goes below the bar, the Ctrl-C handler is restored
        stop.restore()
        bar.close()
        raise
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if master:
        print(f"done: step {step}, checkpoint in {out}", file=sys.stderr)


def main(argv=None):
    cfg, resume = parse_args(argv)
    try:
        with warnings_via_tqdm():  # a warning goes above the progress bar, not onto its line
            train(cfg, resume)
    except (T.UsageError, T.Diverged, D.DataError, LoadError, AudioError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
