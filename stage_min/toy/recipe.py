"""The two toy STAGE models shipped in weights/, rebuilt from nothing on a CPU:

    python -m stage_min.toy weights/stage-toy [--bass-out weights/stage-toy-bass] [--work runs/toy] [--probe DIR]
    python -m stage_min.toy weights/stage-toy --report      # print the validation and sealed figures of WORK

Phases, each kept in the work folder so that a stopped run (a session can end mid-way) picks up where it
was; each phase's wall time goes to WORK/phases.json:
1. songs: synthetic songs in `synth.TOY_GM` style (70-180 BPM, 3/4, 4/4 and 5/4; drums, bass and chords
   played by FluidSynth on General MIDI kits and programs, gm.py) -> WORK/songs (each evaluation phase
   draws its own set's songs);
2. codec: a small EnCodec-architecture codec trained on such audio (`codec_train`) -> WORK/codec, with
   its measurements on held-out songs (`codec_train.codec_report`) in WORK/codec/report.json;
3. base: a tiny random T5 and sentencepiece model with that codec, in transformers' layout -> WORK/base;
4. lm: `train.py --preset tiny` with the toy's options (TRAIN_OPTIONS), the drums model (context: bass +
   chords) and the bass model (context: drums + chords) side by side, each --steps steps, the last
   --cooldown-steps of them at the lower --cooldown-lr -> WORK/lm-drums, WORK/lm-bass (logs beside them);
5. package: each run exported self-contained (native layout, fp16) with the window it was trained on
   and its sampling temperature -> OUT and --bass-out;
6. eval-validation, eval-sealed: evaluate.py's experiments on the two sets below -> WORK/eval/SET, and
   a table of both (also `--report`). A phase that fails stops the command with one line; the same
   command resumes it.

Two sets, drawn apart: every choice (checkpoint, temperature, recipe) is made on VALIDATION; SEALED
(tempi, seeds and song seeds no run trains or chooses on) gives the model cards' headline numbers.

Why the toy's context is as long as its target (a fixed 2 s + 2 s window, not STAGE's 5-10 s context
prefix): target frame t must find context frame t, which sits a fixed number of steps back only when
the context length is fixed. Even then a from-scratch LM does not find that offset through MusicGen's
sinusoidal positions in CPU time; `train.py --align-init` starts one head looking there, and copy
windows (`--p-copy-context`) reward reading it from the first steps (docs/training.md).
"""
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import synth
from ..cli.options import OneLineParser
from .codec_train import CodecTrainConfig

ROOT = Path(__file__).resolve().parents[2]
WINDOW_SECONDS = 2.0  # context and target window: target frame t sits 101 steps after context frame t
SONG_SECONDS = 6.0  # training songs
EVAL_SECONDS = 8.0  # the tempo and song experiments' stems
LONG_SECONDS = 60.0  # whole songs (made in overlapping 2 s windows)
STEPS, COOLDOWN_STEPS, COOLDOWN_LR = 4000, 500, 3e-4  # the last COOLDOWN_STEPS at the lower lr settle the model
# the toy's own sampling temperature, written into its config.json (0.6 followed the click more closely than
# 0.8 and 1.0 on validation seeds, MODEL_CARD.md); sample.py --temperature overrides it
TEMPERATURE = 0.6
TARGETS = {"drums": "bass,chords", "bass": "drums,chords"}  # target -> its context stems
TRAIN_OPTIONS = [  # train.py options of the toy LMs (beside --data/--out/--base/--max-steps/--target)
    "--preset", "tiny", "--dim", "128", "--layers", "4", "--heads", "4",
    "--target-seconds", str(WINDOW_SECONDS), "--context-min", str(WINDOW_SECONDS), "--context-max", str(WINDOW_SECONDS),
    "--batch-size", "8", "--lr", "1e-3", "--eval-every", "500", "--save-every", "500", "--eval-windows", "64",
    "--val-fraction", "0.02", "--p-full-context", "0", "--no-augment",
    # what makes a from-scratch toy read its context (docs/training.md): a head that starts at the context's
    # same time, and copy windows (the context is the target stem itself) that reward reading it at once
    "--align-init", "--p-copy-context", "0.2", "--code-cache",
    # the data rules of the earlier toys (before the original's became train.py's defaults)
    "--silence-rule", "peak", "--retry", "any-song",
]


@dataclass(frozen=True)
class EvalSet:
    """What a toy is measured on: click tracks (tempi x meters x sampling seeds), 8 s windows of
    songs drawn with `songs_seed`, and whole songs drawn with `long_seed` (none: skipped)."""
    name: str
    bpms: tuple
    meters: tuple
    seeds: tuple
    songs_seed: int
    n_songs: int
    long_seed: int | None = None
    n_long: int = 0
    diagnostics: bool = False  # also the songs with one context stem only (bass, or chords): what the drums follow


# validation: what temperatures, checkpoints and recipes were chosen on; sealed: only ever measured
VALIDATION = EvalSet("validation", bpms=(80, 100, 120, 140, 160), meters=(3, 4, 5), seeds=(0, 1), songs_seed=500,
                     n_songs=24, diagnostics=True)
SEALED = EvalSet("sealed", bpms=(72, 94, 116, 138, 160, 178), meters=(3, 4, 5), seeds=(100, 101, 102, 103),
                 songs_seed=1000, n_songs=24, long_seed=2000, n_long=4)


def log(msg: str):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- phases ----------------------------------------------------------------------------------------
def run_phase(work: Path, name: str, fn):
    """fn() unless WORK/phases.json says the phase is done; its wall time is added up over resumptions."""
    from ..io.loading import write_atomic

    record = work / "phases.json"
    phases = json.loads(record.read_text()) if record.exists() else {}
    if phases.get(name, {}).get("done"):
        log(f"{name}: done already ({phases[name]['seconds'] / 60:.1f} min)")
        return
    log(name)
    t0, done = time.time(), False
    try:
        fn()
        done = True
    finally:
        phases = json.loads(record.read_text()) if record.exists() else {}
        seconds = phases.get(name, {}).get("seconds", 0.0) + time.time() - t0
        phases[name] = {"seconds": round(seconds, 1), "done": done}
        write_atomic(record, lambda p: Path(p).write_text(json.dumps(phases, indent=2) + "\n"))


def write_songs(folder: Path, n_songs: int, seconds: float, seed: int):
    if (folder / "done").exists():
        return
    synth.write_dataset(folder, n_songs, seconds, seed, style=synth.TOY_GM)
    (folder / "done").write_text(f"{n_songs}\n")


def eval_songs(work: Path, s: "EvalSet"):
    """The set's songs: 10 s ones for the 8 s windows (a window starts where every part plays), whole ones."""
    write_songs(work / f"{s.name}-songs", s.n_songs, EVAL_SECONDS + 2, s.songs_seed)
    if s.long_seed is not None:
        write_songs(work / f"{s.name}-long", s.n_long, LONG_SECONDS, s.long_seed)
    if s.diagnostics:  # the same songs, one context stem each (links, not copies)
        for kept in ("bass", "chords"):
            for song in sorted((work / f"{s.name}-songs").glob("song_*")):
                d = work / f"{s.name}-songs-{kept}-only" / song.name
                d.mkdir(parents=True, exist_ok=True)
                for f in ("drums.wav", f"{kept}.wav", "beats.txt", "caption.txt"):
                    if not (d / f).exists():
                        (d / f).symlink_to((song / f).resolve())


def make_codec(folder: Path, cfg):
    from .codec_train import codec_report, train_codec

    if not (folder / "config.json").exists():
        model = train_codec(cfg, log=log)
        model.save_pretrained(folder)
    else:
        from transformers import EncodecModel

        model = EncodecModel.from_pretrained(folder).eval()
    report = codec_report(model, n_songs=cfg.check_songs)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"codec on held-out songs: {json.dumps(report)}")


def make_base(folder: Path, codec_folder: Path, seed: int):
    """A tiny random T5 + spiece.model, and the trained codec, as a transformers MusicGen folder."""
    from transformers import EncodecModel

    from . import tiny

    if (folder / "config.json").exists():
        return
    codec = EncodecModel.from_pretrained(codec_folder)
    tiny.build(folder, seed=seed, codec=codec)


def train_lms(work: Path, steps: int, seed: int, cooldown: tuple[int, float]):
    """Both LMs at once, one thread each: a model this small keeps one core busy, not two, so two runs side
    by side take about the time of one."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [lm_command(work / f"lm-{t}", t, work / "songs", work / "base", steps, seed, cooldown) for t in TARGETS]
    runs = []
    for cmd, target in zip(commands, TARGETS):
        if cmd is not None:
            log(" ".join(cmd))
            log_file = open(work / f"lm-{target}.log", "a")
            runs.append((target, subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT), log_file))
    failed = []
    for target, process, log_file in runs:
        if process.wait() != 0:
            failed.append(f"{target} (train.py exit {process.returncode}; see {work / f'lm-{target}.log'})")
        log_file.close()
    if failed:
        raise RuntimeError(f"LM training failed: {', '.join(failed)}")


def lm_command(run: Path, target: str, songs: Path, base: Path, steps: int, seed: int, cooldown: tuple[int, float]):
    """train.py on `songs` up to `steps` in all (resuming the run in `run` if there is one), the last
    `cooldown[0]` of them at lr `cooldown[1]`; None when the run has all its steps."""
    from ..train.training import latest_checkpoint

    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(songs), "--out", str(run), "--base", str(base),
           "--max-steps", str(steps), "--seed", str(seed), "--target", target, "--context-stems", TARGETS[target],
           *TRAIN_OPTIONS]
    if cooldown[0]:
        cmd += ["--cooldown-steps", str(cooldown[0]), "--cooldown-lr", f"{cooldown[1]:g}"]
    done = latest_checkpoint(run)
    if done is not None:
        if json.loads((done / "config.json").read_text()).get("step", 0) >= steps:
            return None
        cmd.append("--resume")
    return cmd


def package(run: Path, out: Path, temperature: float = TEMPERATURE):
    from ..generate import SamplingConfig
    from ..io.formats import export_native
    from ..io.loading import follow_latest
    from ..io.pretrained import from_pretrained

    if (out / "config.json").exists():
        return
    model = from_pretrained(str(run))
    model.sampling = SamplingConfig(temperature=temperature)
    step = json.loads((follow_latest(run) / "config.json").read_text()).get("step")
    export_native(model, out, extra={"window_seconds": WINDOW_SECONDS, "trained_steps": step}, dtype="float16")


# ---- evaluation ------------------------------------------------------------------------------------
def evaluate_drums(model_dir: Path, work: Path, s: EvalSet, out: Path, probe: Path | None = None) -> dict:
    """Click tracks of every tempo and meter, 8 s song windows and whole songs, each beside its
    context-dropped baseline (evaluate.py's experiments); the real-music probe when `probe` is given."""
    from ..eval import evaluation as E
    from ..io.pretrained import from_pretrained

    model = from_pretrained(str(model_dir))
    first_seed = s.seeds[0]
    tempo = _saved(E.tempo_experiment(model, list(s.bpms), list(s.seeds), EVAL_SECONDS, "", out / "tempo", meters=s.meters),
                   out / "tempo")
    summary = {"tempo_f1": tempo["mean"], "tempo_f1_nocontext": tempo["mean_nocontext"]}
    for m in tempo["per_meter"]:
        summary.update({f"tempo_f1_m{m['meter']}": m["f_measure"], f"tempo_f1_m{m['meter']}_nocontext": m["f_measure_nocontext"]})
    summary.update(_songs(model, "drums", work / f"{s.name}-songs", out / "songs", EVAL_SECONDS, first_seed, "songs"))
    if s.diagnostics:
        for kept in ("bass", "chords"):
            summary.update(_songs(model, "drums", work / f"{s.name}-songs-{kept}-only", out / f"songs-{kept}-only",
                                  EVAL_SECONDS, first_seed, f"songs_{kept}_only"))
    if s.long_seed is not None:
        summary.update(_songs(model, "drums", work / f"{s.name}-long", out / "long", LONG_SECONDS, first_seed, "long"))
    if probe is not None:
        res = _saved(E.context_experiment(model, E.probe_files(probe), "drums", out / "probe", seconds=10.0, seed=first_seed),
                     out / "probe")
        summary.update(probe_f1=res["mean"], probe_f1_nocontext=res["mean_nocontext"])
    return summary


def evaluate_bass(model_dir: Path, work: Path, s: EvalSet, out: Path) -> dict:
    """Song windows and whole songs: the bass's onsets against the song's beats, and its pitch classes
    against the chords' roots (evaluate.py's pitch_agreement), each beside the context-dropped baseline."""
    from ..io.pretrained import from_pretrained

    model = from_pretrained(str(model_dir))
    summary = _songs(model, "bass", work / f"{s.name}-songs", out / "songs", EVAL_SECONDS, s.seeds[0], "songs")
    if s.long_seed is not None:
        summary.update(_songs(model, "bass", work / f"{s.name}-long", out / "long", LONG_SECONDS, s.seeds[0], "long"))
    return summary


def _songs(model, target: str, songs: Path, out: Path, seconds: float, seed: int, name: str) -> dict:
    from ..eval import evaluation as E

    res = _saved(E.accompany_experiment(model, songs, target, out, seconds=seconds, seed=seed, split="all"), out)
    summary = {f"{name}_f1": res["mean"], f"{name}_f1_nocontext": res["mean_nocontext"],
               f"{name}_f1_reference": res["mean_reference"]}
    if "mean_pitch_agreement" in res:
        summary.update({f"{name}_pitch": res["mean_pitch_agreement"], f"{name}_pitch_nocontext": res["mean_pitch_agreement_nocontext"],
                        f"{name}_pitch_reference": res["mean_pitch_agreement_reference"]})
    return summary


def _saved(results: dict, out: Path) -> dict:
    from ..eval import evaluation as E

    E.write_results(results, out)
    E.write_report(results, out)
    return results


def evaluate_set(work: Path, s: EvalSet, drums: Path, bass: Path, probe: Path | None):
    from ..eval.evaluation import jsonable
    from ..io.loading import write_atomic

    out = work / "eval" / s.name
    eval_songs(work, s)
    summary = {"set": asdict(s), "drums": evaluate_drums(drums, work, s, out / "drums", probe),
               "bass": evaluate_bass(bass, work, s, out / "bass")}
    write_atomic(out / "summary.json", lambda p: Path(p).write_text(json.dumps(jsonable(summary), indent=2) + "\n"))


def report(work: Path) -> str:
    """The figures of both sets side by side, sealed first (the headline), then each phase's time."""
    sets = {}
    for s in (SEALED, VALIDATION):
        f = work / "eval" / s.name / "summary.json"
        if f.exists():
            sets[s.name] = json.loads(f.read_text())
    lines = []
    if sets:
        lines.append(f"{'model':6} {'measure':34} " + " ".join(f"{n:>10}" for n in sets))
        for model in ("drums", "bass"):
            keys = sorted({k for v in sets.values() for k, x in v[model].items() if not isinstance(x, dict)})
            for k in keys:
                values = [v[model].get(k) for v in sets.values()]
                lines.append(f"{model:6} {k:34} " + " ".join(f"{x:10.3f}" if isinstance(x, (int, float)) else f"{'-':>10}" for x in values))
    phases = work / "phases.json"
    if phases.exists():
        times = json.loads(phases.read_text())
        lines.append("phases: " + ", ".join(f"{k} {v['seconds'] / 60:.1f} min{'' if v['done'] else ' (not done)'}"
                                            for k, v in times.items()))
        lines.append(f"in all: {sum(v['seconds'] for v in times.values()) / 60:.1f} min")
    return "\n".join(lines) or f"nothing measured yet in {work}"


# ---- the command -----------------------------------------------------------------------------------
def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("out", help="drums model folder to write (must not exist, unless the run is resumed)")
    p.add_argument("--bass-out", default=None, help="bass model folder (default: OUT-bass)")
    p.add_argument("--work", default="runs/toy", help="folder for the songs, codec, base, LM runs and evaluation")
    p.add_argument("--songs", type=int, default=4000, help="synthetic songs to train the LMs on")
    p.add_argument("--song-seconds", type=float, default=SONG_SECONDS, help="length of each training song")
    p.add_argument("--steps", type=int, default=STEPS, help="LM optimizer steps of each model, the cooldown included")
    p.add_argument("--cooldown-steps", type=int, default=COOLDOWN_STEPS, help="the last steps, at --cooldown-lr (0: none)")
    p.add_argument("--cooldown-lr", type=float, default=COOLDOWN_LR, help="learning rate of the cooldown (the others: 1e-3)")
    p.add_argument("--codec-steps", type=int, default=CodecTrainConfig.steps, help="codec autoencoder steps")
    p.add_argument("--codec-songs", type=int, default=CodecTrainConfig.songs, help="songs the codec is trained on")
    p.add_argument("--seed", type=int, default=0, help="seed of the training songs, codec and LM runs")
    p.add_argument("--probe", default=None, help="a folder of real mixes (e.g. the STAGE repository's audio/drums): "
                   "the sealed evaluation's real-music probe")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation phases")
    p.add_argument("--report", action="store_true", help="only print the figures and phase times of --work")
    a = p.parse_args(argv)
    for name, low in (("songs", 1), ("steps", 1), ("cooldown_steps", 0), ("codec_steps", 1), ("codec_songs", 1)):
        if getattr(a, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(a, name)}")
    if a.cooldown_steps >= a.steps:
        p.error(f"--cooldown-steps must be below --steps ({a.steps}), got {a.cooldown_steps}")
    if not 0 < a.cooldown_lr < 1:  # NaN fails too
        p.error(f"--cooldown-lr must be > 0 and < 1, got {a.cooldown_lr:g}")
    if not 0 < a.song_seconds <= synth.MAX_SECONDS:  # NaN fails too
        p.error(f"--song-seconds must be > 0 and at most {synth.MAX_SECONDS:g}, got {a.song_seconds:g}")
    if a.probe is not None and not Path(a.probe).is_dir():
        p.error(f"--probe {a.probe}: no such folder")
    a.bass_out = a.bass_out or f"{a.out.rstrip('/')}-bass"
    return a, p


def main(argv=None):
    a, p = parse_args(argv)
    work = Path(a.work)
    if a.report:
        print(report(work))
        return
    from ..io.formats import LoadError, check_new_folder

    phases = json.loads((work / "phases.json").read_text()) if (work / "phases.json").exists() else {}
    if "package" not in phases:  # (a resumed run may have written them)
        for out in (a.out, a.bass_out):
            try:  # found now, not after an hour of training
                check_new_folder(out)
            except LoadError as e:
                p.error(str(e))
    codec_cfg = CodecTrainConfig(steps=a.codec_steps, songs=a.codec_songs, seed=a.seed,
                                 finetune_steps=max(1, a.codec_steps * CodecTrainConfig.finetune_steps // CodecTrainConfig.steps),
                                 kmeans_frames=min(CodecTrainConfig.kmeans_frames, a.codec_songs * 2000),
                                 check_songs=min(CodecTrainConfig.check_songs, a.codec_songs))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_phases(a, work, codec_cfg)
    except (RuntimeError, OSError, ValueError, LoadError) as e:  # a failed phase: its progress is kept, say why in one line
        print(f"error: {e} (run the same command again to resume; {work / 'phases.json'} says what is done)", file=sys.stderr)
        sys.exit(1)
    print(report(work))


def run_phases(a, work: Path, codec_cfg):
    cooldown = (a.cooldown_steps, a.cooldown_lr)
    out, bass_out = Path(a.out), Path(a.bass_out)
    run_phase(work, "songs", lambda: write_songs(work / "songs", a.songs, a.song_seconds, a.seed))
    run_phase(work, "codec", lambda: make_codec(work / "codec", codec_cfg))
    run_phase(work, "base", lambda: make_base(work / "base", work / "codec", a.seed))
    run_phase(work, "lm", lambda: train_lms(work, a.steps, a.seed, cooldown))
    run_phase(work, "package", lambda: (package(work / "lm-drums", out), package(work / "lm-bass", bass_out)))
    if not a.no_eval:
        probe = Path(a.probe) if a.probe else None
        for s in (VALIDATION, SEALED):
            run_phase(work, f"eval-{s.name}", lambda s=s: evaluate_set(work, s, out, bass_out, probe if s is SEALED else None))


if __name__ == "__main__":
    main()
