"""The toy STAGE shipped in weights/stage-toy, rebuilt from nothing on a CPU:

    python -m stage_min.toy weights/stage-toy [--work runs/toy] [--songs 1000] [--steps 3000]

Steps, each kept in the work folder so that a stopped run picks up where it was:
1. songs: synthetic songs in `synth.TOY` style (70-180 BPM, 3/4, 4/4 and 5/4, three fixed kits named in
   the caption) -> WORK/songs;
2. codec: a small EnCodec-architecture codec trained on such audio (`codec_train`) -> WORK/codec;
3. base: a tiny random T5 and sentencepiece model with that codec, in transformers' layout -> WORK/base;
4. lm: `train.py --preset tiny` on the songs, with the toy's options (TRAIN_OPTIONS) -> WORK/lm;
5. package: the run exported self-contained (native layout, fp16) -> OUT, with the geometry it was
   trained on recorded in config.json so that generation uses the same one.

Why the toy's context is as long as its target (a fixed 4 s + 4 s window, not STAGE's 5-10 s context
prefix): target frame t must find context frame t, which sits a fixed number of steps back only when
the context length is fixed. A tiny model learns that fixed offset; with a variable one it did not
learn to follow clicks at all in half an hour of CPU (REFERENCE.md section 9).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .codec_train import CodecTrainConfig

ROOT = Path(__file__).resolve().parents[1]
WINDOW_SECONDS = 4.0
TRAIN_OPTIONS = [  # train.py options of the toy LM (beside --data/--out/--base/--max-steps)
    "--target", "drums", "--preset", "tiny", "--dim", "128", "--layers", "4", "--heads", "4",
    "--target-seconds", str(WINDOW_SECONDS), "--context-min", str(WINDOW_SECONDS), "--context-max", str(WINDOW_SECONDS),
    "--batch-size", "16", "--lr", "1e-3", "--eval-every", "250", "--save-every", "250", "--eval-windows", "64",
    "--val-fraction", "0.02",
    # the toy's own recipe, not the original STAGE's (train.py's defaults): synthetic songs' chords may be
    # in a context (the original's stem list is MoisesDB's), no augmentation, bf16, global-norm clipping,
    # MusicGen's start step and special row, loss on every step
    "--context-stems", "all", "--no-augment", "--precision", "bf16", "--clip-mode", "norm", "--no-decay-1d",
    "--loss-all-steps", "--train-special-row", "--attend-start-step",
]


def log(msg: str):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_songs(folder: Path, n_songs: int, seconds: float, seed: int):
    from . import synth

    if (folder / "done").exists():
        return
    synth.write_dataset(folder, n_songs, seconds, seed, style=synth.TOY)
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


def train_lm(run: Path, songs: Path, base: Path, steps: int, seed: int):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(songs), "--out", str(run), "--base", str(base),
           "--max-steps", str(steps), "--seed", str(seed), *TRAIN_OPTIONS]
    from .training import latest_checkpoint

    done = latest_checkpoint(run)
    if done is not None:
        if json.loads((done / "config.json").read_text()).get("step", 0) >= steps:
            return
        cmd.append("--resume")
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def package(run: Path, out: Path):
    from .formats import export_native
    from .pipeline import MusicGen

    from .loading import follow_latest

    model = MusicGen.from_pretrained(str(run))
    step = json.loads((follow_latest(run) / "config.json").read_text()).get("step")
    export_native(model, out, extra={"window_seconds": WINDOW_SECONDS, "trained_steps": step}, dtype="float16")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="model folder to write (must not exist)")
    p.add_argument("--work", default="runs/toy", help="folder for the songs, codec, base and LM run")
    p.add_argument("--songs", type=int, default=1000, help="synthetic songs to train the LM on")
    p.add_argument("--song-seconds", type=float, default=6.0, help="length of each song")
    p.add_argument("--steps", type=int, default=3000, help="LM optimizer steps")
    p.add_argument("--codec-steps", type=int, default=CodecTrainConfig.steps, help="codec autoencoder steps")
    p.add_argument("--codec-songs", type=int, default=CodecTrainConfig.songs, help="songs the codec is trained on")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    codec_cfg = CodecTrainConfig(steps=a.codec_steps, songs=a.codec_songs, seed=a.seed,
                                 finetune_steps=max(1, a.codec_steps * CodecTrainConfig.finetune_steps // CodecTrainConfig.steps),
                                 kmeans_frames=min(CodecTrainConfig.kmeans_frames, a.codec_songs * 2000))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log("songs"), make_songs(work / "songs", a.songs, a.song_seconds, a.seed)
    log("codec"), make_codec(work / "codec", codec_cfg)
    log("base"), make_base(work / "base", work / "codec", a.seed)
    log("lm"), train_lm(work / "lm", work / "songs", work / "base", a.steps, a.seed)
    log("package"), package(work / "lm", Path(a.out))
    log(f"done in {(time.time() - t0) / 60:.1f} min: {a.out}")


if __name__ == "__main__":
    main()
