"""Fine-tune MusicGen into STAGE: generate one stem given a mixture (or a click track) as a prefix.

    python train.py --data DIR --target drums --preset small --out runs/drums [--base PATH_OR_HUB_ID]
                    [--max-steps N] [--resume] ...
    torchrun --nproc_per_node=N train.py ... [--fsdp]  # DistributedDataParallel, or FSDP2 shards with --fsdp

The run folder is the checkpoint: `python sample.py --model runs/drums ...` loads it.
"""
import contextlib
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass
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
from stage_min.train.memory import plan_text
from stage_min.train.sharding import load_optimizer_shard, shard
from stage_min.train.options import add_options, given_options
from stage_min.stage import StageLoss


def parse_args(argv=None) -> tuple[T.TrainConfig, bool]:
    """Every option of TrainConfig and DataConfig (their fields hold default, help and check; the
    defaults are the original STAGE recipe), plus the few that are parsed by hand."""
    p = OneLineParser(description=__doc__)
    p.add_argument("--data", required=True, help="stems dataset folder (one folder per song)")
    p.add_argument("--target", required=True, help="stem to generate: drums, bass, ...")
    p.add_argument("--out", required=True, help="run folder: checkpoint, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_options(p, T.TrainConfig)
    add_options(p, D.DataConfig)
    d = D.DataConfig()
    p.add_argument("--context-stems", default=None, help=f"stems a context may use (comma list, the target left out), "
                   f"or 'all' (default: {','.join(d.context_stems)}: the original's set, which keeps vocals, percussion, "
                   f"wind and other_plucked out; other names for other datasets)")
    p.add_argument("--exclude", default=None, help="deprecated: any stem but these may be in a context "
                   "(same as --context-stems all minus these)")
    a = p.parse_args(argv)
    names = lambda text: tuple(x.strip().lower() for x in text.split(",") if x.strip())  # noqa: E731
    if a.exclude is not None and a.context_stems is not None:
        p.error("give --context-stems or the deprecated --exclude, not both")
    context_stems = a.context_stems if a.context_stems is not None else ",".join(d.context_stems)
    context_stems = None if a.exclude is not None or context_stems.strip().lower() == "all" else names(context_stems)
    data_cfg = D.DataConfig(target=a.target.lower(), context_stems=context_stems, exclude=names(a.exclude or ""),
                            **given_options(a, D.DataConfig))
    return T.TrainConfig(data=a.data, out=a.out, **given_options(a, T.TrainConfig), data_cfg=data_cfg), a.resume


# ---- the run's steps, in the order train() takes them ---------------------------------------------
@dataclass
class Run:
    """What the steps of one run share (set up once, then changed only by the loop)."""
    cfg: T.TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    micro_bs: int  # examples per process per micro-batch
    model: object = None  # MusicGen: LM (trained), T5 and codec (frozen)
    base: str = ""
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None
    loss_fn: torch.nn.Module = None  # stage.StageLoss, wrapped in DDP across processes
    autocast: object = contextlib.nullcontext
    precision: str = "fp32"  # what the steps run in (CPU runs fp32 whatever --precision says)
    fsdp: bool = False  # the LM sharded over the processes (--fsdp under torchrun), not replicated by DDP
    step: int = 0
    loss: float | None = None  # the last step's, checked before a checkpoint is kept

    @property
    def master(self) -> bool:
        return self.rank == 0


def start_processes(cfg: T.TrainConfig) -> Run:
    """Device, and under torchrun the process group; the global batch split over processes."""
    rank, world, local_rank = T.distributed_env()
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
    return Run(cfg, Path(cfg.out), device, rank, world, cfg.batch_size // (world * cfg.grad_accum), fsdp=cfg.fsdp and world > 1)


def check_out(run: Run):
    """--out is a folder (or not there yet), and not --data or inside it."""
    if run.out.exists() and not run.out.is_dir():
        raise T.UsageError(f"--out {run.out} is a file")
    T.check_out_not_data(run.out, run.cfg.data)


def open_run_folder(run: Run, resume: bool) -> dict | None:
    """Check --out against --resume (returns the saved training state to resume) and clear a killed
    save's temporaries."""
    cfg, out = run.cfg, run.out
    state = None
    if resume:
        state = T.check_resumable(out, cfg)
    elif T.has_checkpoint(out):
        raise T.UsageError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if run.master and out.is_dir():
        T.remove_stale(out)  # temporaries of a save that was killed
    return state


def make_folders(run: Run):
    """--out and the cache folder, writable."""
    for folder, flag in ((run.out, "--out"), (cache_folder(run.cfg), "--cache-dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise T.UsageError(f"{flag} {folder}: cannot create it ({e.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise T.UsageError(f"{flag} {folder} is not writable")


def cache_folder(cfg: T.TrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.data) / ".stage_min_cache"


def find_songs(cfg: T.TrainConfig) -> tuple[list, list]:
    """(training songs, held-out songs), before the slow model load so that a bad --data fails fast."""
    songs = D.find_songs(cfg.data)
    cfg.data_cfg.check_stem_names(songs)
    if any(s.beats_file is None for s in songs):
        check_tracker(cfg.data_cfg.beat_tracker)
    train_songs, val_songs = D.split_songs(songs, cfg.data_cfg.val_fraction, cfg.seed)
    if not train_songs:
        raise T.UsageError(f"--val-fraction {cfg.data_cfg.val_fraction:g} holds out all {len(songs)} songs: none is left "
                           "to train on; lower it")
    return train_songs, val_songs


def build_model(run: Run, state: dict | None):
    """The model (new from --preset/--base, or the run's own on --resume), its optimizer, the loss
    (under DDP across processes) and mixed precision: fp16 autocast + a gradient scaler, or bf16, on CUDA only."""
    cfg = run.cfg
    model, run.base = T.load_for_resume(run.out, cfg) if state else T.build_model(cfg)  # resume: the run's base, not --base
    run.model = model.to(run.device)
    T.freeze_for_training(run.model)
    run.model.lm.checkpoint_blocks = cfg.checkpoint_activations
    if run.fsdp:  # before the optimizer: it holds the shards
        run.loss_fn = shard(StageLoss(run.model.lm, cfg.valid_steps_only), run.device)
    run.optimizer = T.make_optimizer(run.model.lm, cfg, fused=run.device.type == "cuda")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision) if run.device.type == "cuda" else None
    run.autocast = (lambda: torch.autocast("cuda", dtype=half)) if half is not None else contextlib.nullcontext
    run.precision = cfg.precision if half is not None else "fp32"
    run.scaler = torch.amp.GradScaler("cuda", enabled=half == torch.float16)  # fp16 gradients underflow without it
    if state:
        try:
            saved = T.rank_state(run.out, state, run.rank, run.world, run.fsdp)["optimizer"]
            load_optimizer_shard(run.optimizer, saved) if run.fsdp else run.optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise T.UsageError(f"--resume: the optimizer state in {run.out} does not fit this model ({e})") from None
        for group in run.optimizer.param_groups:  # the betas given now win over the saved ones (the lr is set every step)
            group["betas"] = (cfg.beta1, cfg.beta2)
        T.set_rng_state(state["rng"])
        run.step = state["step"]
        if "scaler" in state and run.scaler.is_enabled():
            run.scaler.load_state_dict(state["scaler"])
    run.loss_fn = run.loss_fn or T.StageLoss(run.model.lm, cfg.valid_steps_only)
    if run.world > 1 and not run.fsdp:
        run.loss_fn = torch.nn.parallel.DistributedDataParallel(
            run.loss_fn, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def load_data(run: Run, train_songs: list, val_songs: list):
    """Training windows (and, with --code-cache, each song's codes) and the fixed held-out batches.
    Rank 0 reads the songs first (stem peaks and beats, cached); the others then read its cache."""
    cfg, codec, stats = run.cfg, run.model.codec, D.Stats()

    def prepare(songs):
        bar = tqdm(songs, desc="reading songs (stem peaks, beats; cached)", unit="song",
                   disable=not run.master or len(songs) < 2, leave=False)
        prepared = [D.prepare_song(s, cfg.data_cfg, codec, run.device, cache_folder(cfg), stats) for s in bar]
        return [sd for sd in prepared if sd is not None]  # None: a song with no usable target

    if run.world > 1 and not run.master:
        dist.barrier()
    train_data, val_data = prepare(train_songs), prepare(val_songs)
    if run.world > 1 and run.master:
        dist.barrier()
    try:
        windows = D.StemWindows(train_data, cfg.data_cfg, codec.frame_rate, codec.sample_rate, stats)
    except D.DataError as e:
        held = f" ({len(val_songs)} of {len(train_songs) + len(val_songs)} songs are held out by --val-fraction " \
               f"{cfg.data_cfg.val_fraction:g})" if val_songs else ""
        raise D.DataError(f"no training songs left: {e}{held}") from None
    song_codes = T.SongCodes(windows.songs, codec, run.device) if cfg.code_cache else None
    eval_batches = []
    if run.master or run.fsdp:  # fixed held-out windows, encoded once, each by itself (as at inference) even with --code-cache
        ex = T.validation_windows(val_songs, val_data, cfg, codec, stats)
        for i in range(0, len(ex), run.micro_bs):
            chunk = ex[i:i + run.micro_bs]
            eval_batches.append(T.make_batch(run.model, chunk, [False] * len(chunk), [False] * len(chunk), run.device,
                                             encode_precision=cfg.data_cfg.encode_precision))
    if run.master:
        n_params = sum(p.numel() for p in run.model.lm.parameters())
        n_trained = sum(p.numel() for p in run.model.lm.parameters() if p.requires_grad)
        print(f"{len(windows.songs)} training songs, {len(val_data)} held out; {stats.summary()}; "
              f"LM {n_params / 1e6:.1f}M parameters ({n_trained / 1e6:.2f}M trained); {run.world} process(es){' (FSDP)' if run.fsdp else ''}, {run.micro_bs} x {cfg.grad_accum} per process; "
              f"{run.precision}", file=sys.stderr)
    return windows, song_codes, eval_batches


def train_step(run: Run, windows, song_codes) -> tuple[float, int]:
    """One optimizer step over --grad-accum micro-batches: (the global batch's loss, target frames seen).
    Raises T.Diverged on a non-finite loss or gradient, before the update touches the weights."""
    cfg, lm = run.cfg, run.model.lm
    loss_sum, frames = 0.0, 0
    for micro in range(cfg.grad_accum):
        first = run.rank * run.micro_bs
        examples, drop_text, drop_ctx = T.draw_examples(windows, cfg, run.step, micro, range(first, first + run.micro_bs))
        b = T.make_batch(run.model, examples, drop_text, drop_ctx, run.device, song_codes, cfg.data_cfg.encode_precision)
        # DDP averages gradients on the last micro-batch only; no_sync() is single-use, one per micro-batch
        last = run.world == 1 or micro == cfg.grad_accum - 1
        if run.fsdp:  # FSDP's reduce-scatter on the last micro-batch only, as DDP's no_sync
            run.loss_fn.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or run.fsdp else run.loss_fn.no_sync():
            with run.autocast():
                loss = run.loss_fn(b["grid"], b["keep"], b["target"], b["states"], b["mask"]) / cfg.grad_accum
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach().item()
        frames += b["codes"].numel() // b["codes"].shape[1]
    if run.world > 1:  # log the global batch's loss, not rank 0's share of it
        total = torch.tensor([loss_sum], device=run.device)
        dist.all_reduce(total)
        loss_sum = total.item() / run.world
    run.scaler.unscale_(run.optimizer)  # clip the true gradients (a no-op without fp16)
    grad_norm = T.clip_gradients(lm, cfg)
    # fp16: an overflow in the gradients is the scaler's to handle (it skips the step and lowers the
    # scale); a non-finite loss, or gradients without a scaler, mean divergence (the same on every rank)
    if not math.isfinite(loss_sum) or not (run.scaler.is_enabled() or bool(torch.isfinite(grad_norm))):
        raise T.Diverged(f"step {run.step + 1}: the loss ({loss_sum:g}) or the gradient norm ({float(grad_norm):g}) "
                         f"is not finite; stopped without saving: the last checkpoint in {run.out} is kept (try a lower --lr)")
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr_at(run.step)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss_sum, frames * run.world


def save(run: Run):
    if run.fsdp:  # every rank: the model is gathered, each rank writes its optimizer shard
        T.save_sharded(run.out, run.model.lm, run.base, run.step, run.cfg, run.optimizer, run.scaler, loss=run.loss)
    elif run.master:
        T.save_checkpoint(run.out, run.model.lm, run.base, run.step, run.cfg, run.optimizer, run.scaler, loss=run.loss)


def train(cfg: T.TrainConfig, resume: bool):
    cfg.check()
    if cfg.plan:  # --plan: the memory this run would need, without training
        return print(plan_text(cfg))
    run = start_processes(cfg)
    check_out(run)
    # one train.py per run folder (rank 0 holds the lock): a second would take the first's temporary step for stale
    with T.lock_run(run.out) if run.master else contextlib.nullcontext():
        state = open_run_folder(run, resume)
        train_songs, val_songs = find_songs(cfg)
        make_folders(run)
        build_model(run, state)
        windows, song_codes, eval_batches = load_data(run, train_songs, val_songs)
        loop(run, windows, song_codes, eval_batches)
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if run.master:
        print(f"done: step {run.step}, checkpoint in {run.out}", file=sys.stderr)


def loop(run: Run, windows, song_codes, eval_batches):
    """Steps until --max-steps: log, evaluate and save on their schedules; Ctrl-C saves, then exits 130."""
    cfg = run.cfg
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="training", unit="step", disable=not run.master, dynamic_ncols=True)
    t0, frames = time.time(), 0
    stop = T.StopFlag()  # Ctrl-C lands between steps, never inside an optimizer update
    try:
        while run.step < cfg.max_steps:
            if stop.requested:
                raise KeyboardInterrupt
            run.loss, step_frames = train_step(run, windows, song_codes)
            frames += step_frames
            last = run.step == cfg.max_steps
            if run.master and (run.step % cfg.log_every == 0 or last):
                fps = frames / (time.time() - t0)
                bar.set_postfix(loss=f"{run.loss:.3f}", frames_s=f"{fps:.0f}")
                T.log_metrics(run.out, {"step": run.step, "loss": run.loss, "lr": cfg.lr_at(run.step - 1), "target_frames_per_s": fps})
                t0, frames = time.time(), 0
            if (run.master or run.fsdp) and eval_batches and (run.step % cfg.eval_every == 0 or last):
                metrics = T.evaluate(run.model.lm, eval_batches, run.autocast, cfg.valid_steps_only,
                                     run.loss_fn if run.fsdp else None)  # FSDP: every rank, through the root
            if run.master and eval_batches and (run.step % cfg.eval_every == 0 or last):
                T.log_metrics(run.out, {"step": run.step, **metrics})
                bar.write(f"step {run.step}: val loss {metrics['val_loss']:.3f} (context dropped: {metrics['val_loss_nocontext']:.3f})")
            if run.step % cfg.save_every == 0 or last:
                save(run)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        save(run)
        if run.master:
            print(f"interrupted: checkpoint at step {run.step} in {run.out}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    finally:  # e.g. T.Diverged: the error line goes below the bar, the Ctrl-C handler is restored
        stop.restore()
        bar.close()


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
