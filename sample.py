"""Generate a stem that plays along with a song or a click track (STAGE), or music from text alone.

    python sample.py --context song.wav --prompt "funky drums" --out drums.wav --mix-out mix.wav
    python sample.py --bpm 120 --duration 8 --prompt "rock drums" --out drums.wav
    python sample.py --prompt "lofi hip hop beat" --duration 5 --out music.wav
"""
import argparse
import math
import re
import signal
import sys
from pathlib import Path

# Only light imports here: everything else is imported inside main(), so that a Ctrl-C at any moment,
# even while torch is being imported, ends in one line ("error: interrupted", exit 130).

SAMPLE_RATE = 32000  # EnCodec 32 kHz, MusicGen's codec
FRAME_RATE = 50
HOP = SAMPLE_RATE // FRAME_RATE
TOY_MODEL = Path(__file__).resolve().parent / "weights" / "stage-toy"
MAX_FRAMES = 1500  # MusicGen was trained on 30 s windows: the context, the separator and the stem share them
MAX_BPM = 1000.0  # faster than any music; a limit also keeps the click track's size sane
MAX_SEED = 2**63 - 1


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="", help="text description of the stem (or of the music)")
    p.add_argument("--out", required=True, help="output audio file: .wav, .flac, .ogg or .mp3")
    p.add_argument("--context", help="STAGE: audio to accompany (any format soundfile reads)")
    p.add_argument("--bpm", type=float, help="STAGE: accompany a click track at this tempo instead")
    p.add_argument("--beats-per-bar", type=int, default=4, help="click track: beats per bar (louder downbeats)")
    p.add_argument("--offset", type=float, default=0.0, help="click track: time of the first click in seconds")
    p.add_argument("--mix-out", help="also write context + stem, as long as the stem")
    p.add_argument("--overwrite", action="store_true", help="allow --out / --mix-out to replace the --context file")
    p.add_argument("--duration", type=float, help="seconds to generate (default: the context's length; 5 s for text alone)")
    p.add_argument("--model", default=None, help="model folder, checkpoint file or hub id (default: the shipped toy "
                   "STAGE drums model, weights/stage-toy; e.g. facebook/musicgen-small or a train.py run for real music)")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for audiocraft / official STAGE checkpoints")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance coefficient (1 = off)")
    p.add_argument("--top-k", type=int, default=250, help="sample from the k most likely codes (0 = off)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold (0 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    return p.parse_args(argv)


def sampling_config(args):
    from stage_min.generate import SamplingConfig

    return SamplingConfig(cfg_coef=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)


def stem_seconds_limit(args) -> float:
    """The longest stem the model's window holds: all of it for text, less the separator (and at
    least one context frame) with a context or a click track."""
    staged = args.context or args.bpm is not None
    return (MAX_FRAMES - 2 if staged else MAX_FRAMES) / FRAME_RATE


def check_options(args):
    """Everything that can be checked without reading audio or loading a model, so that bad input
    fails at once (numbers are checked to be finite: NaN passes no comparison, inf would pass some)."""
    from stage_min.audio import check_input_file, check_writable, same_file

    sampling_config(args).check()
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2^63 - 1], got {args.seed}")
    if args.duration is not None:
        if not (args.duration > 0 and math.isfinite(args.duration)):
            raise ValueError(f"--duration must be > 0 seconds and finite, got {args.duration:g}")
        if args.duration > stem_seconds_limit(args):
            context = " with a context" if args.context or args.bpm is not None else " for text alone"
            raise ValueError(f"--duration at most {stem_seconds_limit(args):g} s{context}, got {args.duration:g}")
    if args.bpm is not None and not (0 < args.bpm <= MAX_BPM):
        raise ValueError(f"--bpm must be > 0 and at most {MAX_BPM:g}, got {args.bpm:g}")
    if args.beats_per_bar < 1:
        raise ValueError(f"--beats-per-bar must be >= 1, got {args.beats_per_bar}")
    if not (args.offset >= 0 and math.isfinite(args.offset)):
        raise ValueError(f"--offset must be a finite number >= 0 (seconds), got {args.offset:g}")
    if args.context and args.bpm is not None:
        raise ValueError("give --context or --bpm, not both")
    if args.bpm is not None:
        if args.duration is None:
            raise ValueError("--bpm needs --duration (there is no context to take the length from)")
        if args.duration < 1 / FRAME_RATE:
            raise ValueError(f"--duration must be at least {1 / FRAME_RATE:g} s (one codec frame) with --bpm, got {args.duration:g}")
        if args.offset >= args.duration:
            raise ValueError(f"--offset {args.offset:g} s is not before the end of the click track (--duration "
                             f"{args.duration:g} s): it would hold no click")
    if args.mix_out and not (args.context or args.bpm is not None):
        raise ValueError("--mix-out needs --context or --bpm")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device or "cpu"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.context:
        check_input_file(args.context)  # a FIFO, a folder, a symlink loop: refused before it is opened
    check_writable(args.out)
    if args.mix_out:
        check_writable(args.mix_out)
        if same_file(args.out, args.mix_out):
            raise ValueError(f"--mix-out and --out are the same file ({args.out}): the mix would replace the stem")
    for flag, path in (("--out", args.out), ("--mix-out", args.mix_out)):
        if path and args.context and same_file(path, args.context) and not args.overwrite:
            raise ValueError(f"{flag} {path} is the --context file: it would be overwritten "
                             "(choose another name, or pass --overwrite)")


def read_context(args):
    """(context as mono 32 kHz audio, or None for text alone; the whole context's length in frames).
    Only the part of a file the model or the mix can use is read (a partial read)."""
    import numpy as np

    from stage_min.audio import AudioError, audio_seconds, load_audio

    if args.context:
        total = int(audio_seconds(args.context) * SAMPLE_RATE) // HOP
        longest = args.duration if args.duration is not None else (MAX_FRAMES - 1) // 2 / FRAME_RATE
        audio = load_audio(args.context, SAMPLE_RATE, max_seconds=longest + 2 / FRAME_RATE)
        if len(audio) < HOP:
            raise AudioError(f"{args.context}: too short: {len(audio)} samples at {SAMPLE_RATE} Hz "
                             f"({len(audio) / SAMPLE_RATE * 1000:.2f} ms); the model needs at least {HOP} samples (one 20 ms frame)")
        if np.abs(audio).max() < 1e-4:
            raise AudioError(f"{args.context}: the audio is silent")
        return audio, max(total, len(audio) // HOP)
    if args.bpm is not None:
        from stage_min.metronome import metronome

        audio = metronome(args.bpm, args.duration, args.beats_per_bar, args.offset, SAMPLE_RATE)
        return audio, len(audio) // HOP
    return None, 0


def plan_frames(args, context, total_frames: int) -> tuple[int, int]:
    """(stem frames, context frames), cutting the context to what the model can take.
    total_frames: the whole context's length (only its first part may have been read)."""
    if context is None:
        seconds = 5.0 if args.duration is None else args.duration
        return max(1, round(seconds * FRAME_RATE)), 0
    read_frames = len(context) // HOP
    if args.duration is None:  # as long as the context, as much as fits next to it
        n_frames = kept = min(read_frames, (MAX_FRAMES - 1) // 2)
        cut = kept < total_frames
    else:
        n_frames = max(1, round(args.duration * FRAME_RATE))
        kept = min(read_frames, n_frames, MAX_FRAMES - 1 - n_frames)
        cut = kept < min(total_frames, n_frames)  # a context longer than the stem is not needed: no warning
    if cut:
        print(f"warning: the context is {total_frames / FRAME_RATE:.2f} s; the model takes {MAX_FRAMES / FRAME_RATE:g} s "
              f"of context + stem: kept its first {kept / FRAME_RATE:.2f} s for a {n_frames / FRAME_RATE:.2f} s stem",
              file=sys.stderr)
    return n_frames, kept


def run(args, interrupted):
    check_options(args)
    context, total_frames = read_context(args)
    n_frames, context_frames = plan_frames(args, context, total_frames)

    import numpy as np
    import torch  # heavy imports only once the input is known to be good

    from stage_min.audio import save_audio
    from stage_min.pipeline import MusicGen

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    sampling = sampling_config(args)
    if args.model is None:
        if not (TOY_MODEL / "config.json").exists():
            raise ValueError(f"the toy model is missing from {TOY_MODEL}: rebuild it with "
                             "`python -m stage_min.toy weights/stage-toy`, or pass --model")
        args.model = str(TOY_MODEL)
        print(f"using the toy STAGE drums model in {TOY_MODEL} (synthetic drums, trained on a CPU); "
              "pass --model for real music, e.g. a STAGE checkpoint or facebook/musicgen-small", file=sys.stderr)
    model = MusicGen.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype), stage=context is not None, t5=args.t5)
    if context is None:
        audio, _ = model.generate([args.prompt], n_frames, sampling, seed=args.seed, progress=True, compile=args.compile)
    else:
        if model.context_token_added:
            print(f"warning: {args.model} is a plain MusicGen, not a STAGE model: its context token is untrained, "
                  "so the stem will not follow the context", file=sys.stderr)
        audio, _ = model.accompany([torch.from_numpy(context[: context_frames * HOP])], [args.prompt], n_frames,
                                   sampling, seed=args.seed, progress=True, compile=args.compile)
    stem = audio[0, 0].float().cpu().numpy()
    if not np.isfinite(stem).all():
        raise ValueError("the generated audio holds NaN or infinite values; nothing was written")
    outputs = [(args.out, stem, f"{len(stem) / model.sample_rate:.2f} s at {model.sample_rate} Hz")]
    if args.mix_out:
        bed = np.zeros_like(stem)
        bed[: min(len(stem), len(context))] = context[: len(stem)]
        outputs.append((args.mix_out, bed + stem, f"context + stem, {len(stem) / model.sample_rate:.2f} s"))
    for path, samples, what in outputs:
        if interrupted:  # a Ctrl-C that some library swallowed still stops here: nothing is written after it
            raise KeyboardInterrupt
        save_audio(path, samples, model.sample_rate)
        print(f"wrote {path}: {what}")


def main(argv=None):
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)  # remembered even if the exception below is caught by a library
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread (called from a library): no handler of ours
        previous = None
    try:
        args = parse_args(argv)
        run(args, interrupted)
        if interrupted:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # every failure a user can cause ends in one line, never a traceback
        from stage_min.audio import AudioError
        from stage_min.loading import LoadError

        if not isinstance(e, (LoadError, AudioError, ValueError, OSError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
