"""Generate a stem that plays along with a song or a click track (STAGE), or music from text alone.

    python sample.py --context song.wav --prompt "funky drums" --out drums.wav --mix-out mix.wav
    python sample.py --context song.wav --stems drums,bass --model drums=runs/drums --model bass=runs/bass --out out.wav
    python sample.py --context songs/ --model runs/drums --out drums/
    python sample.py --bpm 120 --duration 8 --prompt "rock drums" --out drums.wav
    python sample.py --prompt "lofi hip hop beat" --duration 5 --out music.wav
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

from stage_min.audio import AudioError, check_writable, load_audio, save_audio

SAMPLE_RATE = 32000  # EnCodec 32 kHz, MusicGen's codec
FRAME_RATE = 50
MAX_FRAMES = 1500  # MusicGen was trained on 30 s windows: the context, the separator and the stem share them


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="", help="text description of the stem (or of the music)")
    p.add_argument("--out", required=True, help="output audio file (.wav or .flac)")
    p.add_argument("--context", help="STAGE: audio to accompany (any format soundfile reads)")
    p.add_argument("--bpm", type=float, help="STAGE: accompany a click track at this tempo instead")
    p.add_argument("--beats-per-bar", type=int, default=4, help="click track: beats per bar (louder downbeats)")
    p.add_argument("--offset", type=float, default=0.0, help="click track: time of the first click in seconds")
    p.add_argument("--mix-out", help="also write context + stem, as long as the stem")
    p.add_argument("--duration", type=float, help="seconds to generate (default: the context's length; 5 s for text alone)")
    p.add_argument("--model", action="append", help="model folder, checkpoint file or hub id "
                   "(default facebook/musicgen-small); with --stems, once per stem as NAME=PATH")
    p.add_argument("--stems", help="stack stems in this order, e.g. drums,bass: each accompanies the context plus "
                   "the stems before it; writes OUT_NAME.wav per stem and the full mix (--mix-out, default OUT_mix.wav)")
    p.add_argument("--continue", dest="continuation", help="a stem's first part (audio file): generation continues it")
    p.add_argument("--window", type=float, default=10.0, help="a context longer than this is accompanied in windows "
                   "of this many seconds (10: the training windows)")
    p.add_argument("--overlap", type=float, default=5.0, help="seconds of each window's stem given by the previous window")
    p.add_argument("--batch", type=int, default=4, help="--context FOLDER: songs per batch")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for audiocraft / official STAGE checkpoints")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance coefficient (1 = off)")
    p.add_argument("--top-k", type=int, default=250, help="sample from the k most likely codes (0 = off)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold (0 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    return p.parse_args(argv)


def sampling_config(args):
    from stage_min.generate import SamplingConfig

    return SamplingConfig(cfg_coef=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)


def stem_models(args) -> dict:
    """Stem name -> model path. Without --stems, one stem called "stem" (written to --out itself)."""
    given = args.model or ["facebook/musicgen-small"]
    if not args.stems:
        if len(given) > 1:
            raise ValueError("--model given more than once: name each with --stems and --model NAME=PATH")
        return {"stem": given[0]}
    names = [n.strip() for n in args.stems.split(",")]
    if "" in names or len(set(names)) != len(names) or "mix" in names:
        raise ValueError(f"--stems must be distinct names separated by commas (not 'mix'), got {args.stems!r}")
    models = {}
    for item in given:
        name, _, path = item.partition("=")
        if name not in names or not path:
            raise ValueError(f"--model {item}: with --stems, give --model NAME=PATH for NAME in {','.join(names)}")
        models[name] = path
    missing = [n for n in names if n not in models]
    if missing:
        raise ValueError(f"no model for stem {missing[0]}: give --model {missing[0]}=PATH")
    return {n: models[n] for n in names}


def windowed(args) -> bool:
    """Whole songs (songs.py): a stem exactly as long as the context, in windows when it is long."""
    return args.bpm is not None or (args.context is not None and args.duration is None)


def folder_files(folder) -> list:
    from stage_min.data import AUDIO_EXTS

    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in AUDIO_EXTS)


def output_paths(out, names: list, mix_out=None) -> tuple[dict, Path | None]:
    """({stem: path}, path of the mix or None). One stem goes to OUT itself (its mix to --mix-out, if
    given); a stack writes OUT_NAME.wav per stem and the full mix to --mix-out or OUT_mix.wav."""
    out = Path(out)
    if len(names) == 1 and names[0] == "stem":
        return {"stem": out}, mix_out and Path(mix_out)
    suffix = out.suffix or ".wav"
    return {n: out.with_name(f"{out.stem}_{n}{suffix}") for n in names}, Path(mix_out or out.with_name(f"{out.stem}_mix{suffix}"))


def check_song_options(args):
    """Whole songs, stacks, continuations and folders."""
    args.stem_models = stem_models(args)
    if args.overlap < 0:
        raise ValueError(f"--overlap must be >= 0, got {args.overlap:g}")
    if not round(args.window * FRAME_RATE) > round(args.overlap * FRAME_RATE):
        raise ValueError(f"--window must be longer than --overlap, got {args.window:g} and {args.overlap:g} s")
    if 2 * round(args.window * FRAME_RATE) + 1 > MAX_FRAMES:
        raise ValueError(f"--window at most {(MAX_FRAMES - 1) // 2 / FRAME_RATE:g} s (context + stem share 30 s), got {args.window:g}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    stacked = len(args.stem_models) > 1 or bool(args.stems)
    if (stacked or args.continuation) and not windowed(args):
        raise ValueError("--stems and --continue need --context or --bpm, and make stems as long as the context: drop --duration")
    if args.continuation and stacked:
        raise ValueError("--continue continues one stem: not with --stems")
    if args.context and Path(args.context).is_dir():
        if args.continuation or args.mix_out or args.duration is not None:
            raise ValueError("with a --context folder, --continue, --mix-out and --duration are not available")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: with a --context folder, --out is a folder")
        folder = Path(args.out) if Path(args.out).is_dir() else Path(args.out).parent  # --out, or where it is made
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"--out {args.out}: {folder} does not exist or is not writable")
        if not folder_files(args.context):
            raise ValueError(f"{args.context}: no audio files (.wav, .flac, .ogg, .mp3, .aif, .aiff) in this folder")
        return
    stems, mix = output_paths(args.out, list(args.stem_models), args.mix_out)
    for path in [*stems.values(), mix]:
        if path:
            check_writable(path)


def check_options(args):
    """Everything that can be checked without loading a model, so that bad input fails at once."""
    sampling_config(args).check()
    if args.duration is not None and not args.duration > 0:
        raise ValueError(f"--duration must be > 0 seconds, got {args.duration:g}")
    if args.bpm is not None and not args.bpm > 0:
        raise ValueError(f"--bpm must be > 0, got {args.bpm:g}")
    if args.beats_per_bar < 1:
        raise ValueError(f"--beats-per-bar must be >= 1, got {args.beats_per_bar}")
    if args.offset < 0:
        raise ValueError(f"--offset must be >= 0, got {args.offset:g}")
    if args.context and args.bpm is not None:
        raise ValueError("give --context or --bpm, not both")
    if args.bpm is not None and args.duration is None:
        raise ValueError("--bpm needs --duration (there is no context to take the length from)")
    if args.mix_out and not (args.context or args.bpm is not None):
        raise ValueError("--mix-out needs --context or --bpm")
    check_song_options(args)


def read_song(path) -> np.ndarray:
    audio = load_audio(path, SAMPLE_RATE)
    if len(audio) < SAMPLE_RATE // FRAME_RATE:
        raise AudioError(f"{path}: too short ({len(audio) / SAMPLE_RATE * 1000:.1f} ms; at least 20 ms)")
    if np.abs(audio).max() < 1e-4:
        raise AudioError(f"{path}: the audio is silent")
    return audio


def read_context(args) -> np.ndarray | None:
    """The context as mono 32 kHz audio: a file, a click track, or None for text alone."""
    if args.context:
        return read_song(args.context)
    if args.bpm is not None:
        from stage_min.metronome import metronome

        return metronome(args.bpm, args.duration, args.beats_per_bar, args.offset, SAMPLE_RATE)
    return None


def plan_frames(args, context: np.ndarray | None) -> tuple[int, int]:
    """(stem frames, context frames), cutting the context to what the model can take."""
    if context is None:
        seconds = 5.0 if args.duration is None else args.duration
        if seconds * FRAME_RATE > MAX_FRAMES:
            raise ValueError(f"--duration at most {MAX_FRAMES / FRAME_RATE:g} s for text alone, got {seconds:g}")
        return max(1, round(seconds * FRAME_RATE)), 0
    context_frames = len(context) // (SAMPLE_RATE // FRAME_RATE)
    # a context without --duration is a whole song (run_song); here the stem is --duration long
    n_frames = max(1, round(args.duration * FRAME_RATE))
    if n_frames > MAX_FRAMES - 2:
        raise ValueError(f"--duration at most {(MAX_FRAMES - 2) / FRAME_RATE:g} s with a context, got {args.duration:g}")
    kept = min(context_frames, n_frames, MAX_FRAMES - 1 - n_frames)
    cut = kept < min(context_frames, n_frames)  # a context longer than the stem is not needed: no warning
    if cut:
        print(f"warning: the context is {context_frames / FRAME_RATE:.2f} s; the model takes {MAX_FRAMES / FRAME_RATE:g} s "
              f"of context + stem: kept its first {kept / FRAME_RATE:.2f} s for a {n_frames / FRAME_RATE:.2f} s stem",
              file=sys.stderr)
    return n_frames, kept


def pick_device(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return device


def load_models(args, stage: bool = True) -> dict:
    """Stem name -> MusicGen, every model loaded before any generation (a bad path fails at once)."""
    import torch

    from stage_min.pipeline import MusicGen

    device = pick_device(args)
    models = {}
    for name, path in args.stem_models.items():
        model = MusicGen.from_pretrained(path, device=device, dtype=getattr(torch, args.dtype), stage=stage, t5=args.t5)
        if stage and model.context_token_added:
            print(f"warning: {path} is a plain MusicGen, not a STAGE model: its context token is untrained, "
                  "so the stem will not follow the context", file=sys.stderr)
        models[name] = model
    return models


def write_outputs(paths: dict, stems: dict, mix_path, mix):
    for name, path in paths.items():
        save_audio(path, np.asarray(stems[name]), SAMPLE_RATE)
        print(f"wrote {path}: {len(stems[name]) / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz")
    if mix_path:
        save_audio(mix_path, np.asarray(mix), SAMPLE_RATE)
        print(f"wrote {mix_path}: context + {' + '.join(paths) if len(paths) > 1 else 'stem'}, {len(mix) / SAMPLE_RATE:.2f} s")


def song_options(args) -> dict:
    return dict(window_s=args.window, overlap_s=args.overlap, sampling=sampling_config(args), seed=args.seed,
                progress=True, compile=args.compile)


def accompany(models: dict, songs: list, args, continuations=None) -> list:
    """Per song ({stem: audio}, mix): one stem, or a stack of them (songs.py)."""
    from stage_min import songs as whole

    prompts = [args.prompt] * len(songs)
    if list(models) != ["stem"]:
        return [(stems, mix.numpy()) for stems, mix in whole.stack_songs(models, songs, prompts, **song_options(args))]
    out = whole.accompany_songs(models["stem"], songs, prompts, continuations=continuations, **song_options(args))
    return [({"stem": audio.numpy()}, song + audio.numpy()) for song, (audio, _) in zip(songs, out)]


def run_song(args, context: np.ndarray):
    """A stem (or a stack) exactly as long as the context, however long."""
    continuation = None
    if args.continuation:
        continuation = load_audio(args.continuation, SAMPLE_RATE)
        if len(continuation) < SAMPLE_RATE // FRAME_RATE:
            raise AudioError(f"{args.continuation}: too short to continue (at least 20 ms)")
    models = load_models(args)
    [(stems, mix)] = accompany(models, [context], args, [continuation])
    paths, mix_path = output_paths(args.out, list(models), args.mix_out)
    write_outputs(paths, stems, mix_path, mix)


def run_folder(args):
    """Every audio file of the --context folder, --batch songs at a time; unreadable files skipped."""
    import soundfile as sf

    files, skipped = [], 0
    for f in folder_files(args.context):
        try:
            sf.info(str(f))
            files.append(f)
        except Exception:
            skipped += 1
            print(f"warning: skipping {f}: cannot read audio", file=sys.stderr)
    if not files:
        raise AudioError(f"{args.context}: none of its audio files can be read")
    models = load_models(args)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    done = 0
    for i in range(0, len(files), args.batch):
        names, songs = [], []
        for f in files[i:i + args.batch]:
            try:
                songs.append(read_song(f))
                names.append(f.stem if sum(g.stem == f.stem for g in files) == 1 else f"{f.stem}_{f.suffix[1:]}")
            except AudioError as e:
                skipped += 1
                print(f"warning: skipping {e}", file=sys.stderr)
        for name, (stems, mix) in zip(names, accompany(models, songs, args) if songs else []):
            paths, mix_path = output_paths(out / f"{name}.wav", list(models))
            write_outputs(paths, stems, mix_path, mix)
            done += 1
    print(f"{done} song(s) accompanied into {out}; {skipped} unreadable file(s) skipped")


def run(args):
    check_options(args)
    if args.context and Path(args.context).is_dir():
        return run_folder(args)
    context = read_context(args)
    if context is not None and windowed(args):
        return run_song(args, context)
    n_frames, context_frames = plan_frames(args, context)

    import torch  # heavy imports only once the input is known to be good

    sampling = sampling_config(args)
    model = load_models(args, stage=context is not None)["stem"]
    if context is None:
        audio, _ = model.generate([args.prompt], n_frames, sampling, seed=args.seed, progress=True, compile=args.compile)
    else:
        hop = SAMPLE_RATE // FRAME_RATE
        audio, _ = model.accompany([torch.from_numpy(context[: context_frames * hop])], [args.prompt], n_frames,
                                   sampling, seed=args.seed, progress=True, compile=args.compile)
    stem = audio[0, 0].cpu().numpy()
    save_audio(args.out, stem, model.sample_rate)
    print(f"wrote {args.out}: {len(stem) / model.sample_rate:.2f} s at {model.sample_rate} Hz")
    if args.mix_out:
        bed = np.zeros_like(stem)
        bed[: min(len(stem), len(context))] = context[: len(stem)]
        save_audio(args.mix_out, bed + stem, model.sample_rate)
        print(f"wrote {args.mix_out}: context + stem, {len(stem) / model.sample_rate:.2f} s")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # every failure a user can cause ends in one line, never a traceback
        from stage_min.loading import LoadError

        if not isinstance(e, (LoadError, AudioError, ValueError, OSError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
