"""The toy STAGE shipped in weights/stage-toy, rebuilt from nothing on a CPU:

    python -m stage_min.toy weights/stage-toy [--work runs/toy] [--songs 1000] [--steps 3000] [--fresh-steps 1000]
                                              [--cooldown-steps 500] [--cooldown-lr 3e-4]

Steps, each kept in the work folder so that a stopped run picks up where it was:
1. songs: synthetic songs in `synth.TOY` style (70-180 BPM, 3/4, 4/4 and 5/4, three fixed kits named in
   the caption) -> WORK/songs;
2. codec: a small EnCodec-architecture codec trained on such audio (`codec_train`) -> WORK/codec;
3. base: a tiny random T5 and sentencepiece model with that codec, in transformers' layout -> WORK/base;
4. lm: `train.py --preset tiny` with the toy's options (TRAIN_OPTIONS) -> WORK/lm;
4b. fresh songs: more songs of the same style, drawn with another seed -> WORK/fresh-songs, and the same
   run continued on them (`train.py --resume --data WORK/fresh-songs`) for --fresh-steps more steps: on
   1000 songs the LM starts to memorise (held-out loss flat after about 1800 steps), and songs it has
   never heard make it follow the context more closely (MODEL_CARD.md measures both);
4c. cooldown: the last phase's run goes on for --cooldown-steps more at the lower --cooldown-lr (train.py's
   --cooldown-steps, in the same process so that its code cache is not filled twice): at a constant lr 1e-3
   the click-following swings by 0.1-0.2 F1 between checkpoints 500 steps apart, and a lower lr at the end
   settles it (MODEL_CARD.md);
5. package: the run exported self-contained (native layout, fp16) -> OUT, with the geometry it was
   trained on recorded in config.json so that generation uses the same one, and its sampling temperature
   (TEMPERATURE), which every generation uses unless told otherwise.

Why the toy's context is as long as its target (a fixed 2 s + 2 s window, not STAGE's 5-10 s context
prefix): target frame t must find context frame t, which sits a fixed number of steps back only when
the context length is fixed. Even then a from-scratch LM does not find that offset through MusicGen's
sinusoidal positions in CPU time (it never learnt to follow clicks in earlier toys, nor to copy a context
that is the target itself); `train.py --align-init` starts one head looking there, and copy windows
(`--p-copy-context`) reward reading it from the first steps (docs/training.md).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

from . import synth
from ..cli.options import OneLineParser
from .codec_train import CodecTrainConfig

ROOT = Path(__file__).resolve().parents[2]
WINDOW_SECONDS = 2.0  # context and target window: target frame t sits 101 steps after context frame t
ACCOMPANY_SECONDS = 4.0  # the accompaniment evaluation's stems: two windows of each held-out 6 s song
VAL_FRACTION = 0.02  # 20 of 1000 songs held out, for the accompaniment evaluation (and 60 of the fresh ones)
FRESH_STEPS = 1000  # steps of the fresh-songs phase (the shipped toy's)
COOLDOWN_STEPS, COOLDOWN_LR = 500, 3e-4  # the last phase: a lower lr on the same songs (the shipped toy's)
# the toy's own sampling temperature, written into its config.json: on the tempo experiment's seeds 0-2, 0.6
# followed the click more closely than 0.8 and 1.0 (MODEL_CARD.md); sample.py --temperature overrides it
TEMPERATURE = 0.6
TEMPO_SEEDS = 6  # the tempo experiment's seeds: two 3-seed means of one model differed by 0.13 (MODEL_CARD.md)
TRAIN_OPTIONS = [  # train.py options of the toy LM (beside --data/--out/--base/--max-steps)
    "--target", "drums", "--preset", "tiny", "--dim", "128", "--layers", "4", "--heads", "4",
    "--target-seconds", str(WINDOW_SECONDS), "--context-min", str(WINDOW_SECONDS), "--context-max", str(WINDOW_SECONDS),
    "--batch-size", "8", "--lr", "1e-3", "--eval-every", "250", "--save-every", "250", "--eval-windows", "64",
    "--val-fraction", str(VAL_FRACTION), "--p-full-context", "0", "--context-stems", "bass,chords", "--no-augment",
    # what makes a from-scratch toy read its context (docs/training.md): a head that starts at the context's
    # same time, and copy windows (the context is the drum stem itself) that reward reading it at once
    "--align-init", "--p-copy-context", "0.2", "--code-cache",
    # the data rules the shipped toy was trained with (before the original's became the defaults): a
    # rebuild draws the same windows
    "--silence-rule", "peak", "--retry", "any-song",
]


def log(msg: str):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_songs(folder: Path, n_songs: int, seconds: float, seed: int, style):
    from . import synth

    if (folder / "done").exists():
        return
    synth.write_dataset(folder, n_songs, seconds, seed, style=style)
    (folder / "done").write_text(f"{n_songs}\n")


def make_codec(folder: Path, cfg):
    from .codec_train import train_codec

    if (folder / "config.json").exists():
        return
    model = train_codec(cfg, log=log)
    model.save_pretrained(folder)


def make_base(folder: Path, codec_folder: Path, seed: int):
    """A tiny random T5 + spiece.model, and the trained codec, as a transformers MusicGen folder."""
    from transformers import EncodecModel

    from . import tiny

    if (folder / "config.json").exists():
        return
    codec = EncodecModel.from_pretrained(codec_folder)
    tiny.build(folder, seed=seed, codec=codec)


def train_lm(run: Path, songs: Path, base: Path, steps: int, seed: int, cooldown: tuple[int, float] = (0, 0.0)):
    """train.py on `songs` up to `steps` in all (resuming the run in `run` if there is one, whatever songs
    it was trained on before: the fresh-songs phase continues the first phase's run); the last
    `cooldown[0]` of those steps at lr `cooldown[1]`."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(songs), "--out", str(run), "--base", str(base),
           "--max-steps", str(steps), "--seed", str(seed), *TRAIN_OPTIONS]
    if cooldown[0]:
        cmd += ["--cooldown-steps", str(cooldown[0]), "--cooldown-lr", f"{cooldown[1]:g}"]
    from ..train.training import latest_checkpoint

    done = latest_checkpoint(run)
    if done is not None:
        if json.loads((done / "config.json").read_text()).get("step", 0) >= steps:
            return
        cmd.append("--resume")
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def package(run: Path, out: Path):
    from ..io.formats import export_native
    from ..generate import SamplingConfig
    from ..io.loading import follow_latest
    from ..io.pretrained import from_pretrained

    model = from_pretrained(str(run))
    model.sampling = SamplingConfig(temperature=TEMPERATURE)
    step = json.loads((follow_latest(run) / "config.json").read_text()).get("step")
    export_native(model, out, extra={"window_seconds": WINDOW_SECONDS, "trained_steps": step}, dtype="float16")


def evaluate_model(model_dir: Path, songs: Path, out: Path, seed: int) -> dict:
    """The tempo experiment (click tracks at 80-170 BPM, TEMPO_SEEDS seeds, 8 s) and accompaniment of held-out
    songs (bass + chords as the context, 4 s), each beside its context-dropped baseline (evaluate.py's)."""
    from ..eval import evaluation as E
    from ..io.pretrained import from_pretrained

    model = from_pretrained(str(model_dir))
    tempo = E.tempo_experiment(model, list(range(80, 171, 10)), TEMPO_SEEDS, 8.0, "", out / "tempo")
    E.write_results(tempo, out / "tempo")
    E.write_report(tempo, out / "tempo")
    # the songs are 6 s long: 4 s of each held-out song
    accompany = E.accompany_experiment(model, songs, "drums", out / "accompany", seconds=ACCOMPANY_SECONDS, seed=seed,
                                       val_fraction=VAL_FRACTION, split_seed=seed)
    E.write_results(accompany, out / "accompany")
    E.write_report(accompany, out / "accompany")
    summary = {"tempo_f1": tempo["mean"], "tempo_f1_nocontext": tempo["mean_nocontext"],
               "accompany_f1": accompany["mean"], "accompany_f1_nocontext": accompany["mean_nocontext"],
               "accompany_f1_reference": accompany["mean_reference"],
               **{k: accompany[k] for k in ("fad_encodec", "fad_encodec_nocontext", "kad_encodec", "kad_encodec_nocontext")}}
    (out / "summary.json").write_text(json.dumps(E.jsonable(summary), indent=2))
    log(f"evaluation: {json.dumps(E.jsonable(summary))}")
    return summary


def main(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("out", help="model folder to write (must not exist)")
    p.add_argument("--work", default="runs/toy", help="folder for the songs, codec, base and LM run")
    p.add_argument("--songs", type=int, default=1000, help="synthetic songs to train the LM on")
    p.add_argument("--song-seconds", type=float, default=6.0, help="length of each song")
    p.add_argument("--steps", type=int, default=3000, help="LM optimizer steps on the first songs")
    p.add_argument("--fresh-songs", type=int, default=3000, help="songs of the fresh-songs phase (seed + 1)")
    p.add_argument("--fresh-steps", type=int, default=FRESH_STEPS, help="LM steps on the fresh songs after --steps (0: no such phase)")
    p.add_argument("--cooldown-steps", type=int, default=COOLDOWN_STEPS, help="LM steps at --cooldown-lr after the "
                   "others, on the last phase's songs, in its train.py run (0: no cooldown)")
    p.add_argument("--cooldown-lr", type=float, default=COOLDOWN_LR, help="learning rate of the cooldown (the others: 1e-3)")
    p.add_argument("--codec-steps", type=int, default=CodecTrainConfig.steps, help="codec autoencoder steps")
    p.add_argument("--codec-songs", type=int, default=CodecTrainConfig.songs, help="songs the codec is trained on")
    p.add_argument("--seed", type=int, default=0, help="seed of the songs, codec and LM runs")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation (results in WORK/eval)")
    a = p.parse_args(argv)
    for name, low in (("songs", 1), ("steps", 1), ("fresh_songs", 1), ("fresh_steps", 0), ("cooldown_steps", 0), ("codec_steps", 1), ("codec_songs", 1)):
        if getattr(a, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(a, name)}")
    if not 0 < a.cooldown_lr < 1:  # NaN fails too
        p.error(f"--cooldown-lr must be > 0 and < 1, got {a.cooldown_lr:g}")
    if not 0 < a.song_seconds <= synth.MAX_SECONDS:  # NaN fails too
        p.error(f"--song-seconds must be > 0 and at most {synth.MAX_SECONDS:g}, got {a.song_seconds:g}")
    from ..io.formats import LoadError, check_new_folder

    try:  # found now, not after an hour of training
        check_new_folder(a.out)
    except LoadError as e:
        p.error(str(e))
    codec_cfg = CodecTrainConfig(steps=a.codec_steps, songs=a.codec_songs, seed=a.seed,
                                 finetune_steps=max(1, a.codec_steps * CodecTrainConfig.finetune_steps // CodecTrainConfig.steps),
                                 kmeans_frames=min(CodecTrainConfig.kmeans_frames, a.codec_songs * 2000))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log("songs"), make_songs(work / "songs", a.songs, a.song_seconds, a.seed, synth.TOY)
    log("codec"), make_codec(work / "codec", codec_cfg)
    log("base"), make_base(work / "base", work / "codec", a.seed)
    cooldown = (a.cooldown_steps, a.cooldown_lr)  # the end of the last phase
    if a.fresh_steps == 0:
        log("lm"), train_lm(work / "lm", work / "songs", work / "base", a.steps + a.cooldown_steps, a.seed, cooldown)
    else:
        log("lm"), train_lm(work / "lm", work / "songs", work / "base", a.steps, a.seed)
        log("fresh songs"), make_songs(work / "fresh-songs", a.fresh_songs, a.song_seconds, a.seed + 1, synth.TOY)
        log("lm on fresh songs, then the cooldown"), train_lm(work / "lm", work / "fresh-songs", work / "base",
                                                              a.steps + a.fresh_steps + a.cooldown_steps, a.seed, cooldown)
    log("package"), package(work / "lm", Path(a.out))
    if not a.no_eval:
        log("evaluate"), evaluate_model(Path(a.out), work / "songs", work / "eval", a.seed)
    log(f"done in {(time.time() - t0) / 60:.1f} min: {a.out}")


if __name__ == "__main__":
    main()
