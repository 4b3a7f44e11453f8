"""Generate a stem that plays along with a song or a click track (STAGE), or music from text alone.

    python sample.py --context song.wav --prompt "funky drums" --out drums.wav --mix-out mix.wav
    python sample.py --bpm 120 --duration 8 --prompt "rock drums" --out drums.wav
    python sample.py --prompt "lofi hip hop beat" --duration 5 --out music.wav
    python sample.py --model stage-drums.safetensors --context song.wav --genres "Rock, Indie Rock" --moods "energetic" --out drums.wav
"""
import argparse
import sys

import numpy as np

from stage_min.audio import AudioError, check_writable, load_audio, save_audio
from stage_min.captions import stage_caption

SAMPLE_RATE = 32000  # EnCodec 32 kHz, MusicGen's codec
FRAME_RATE = 50
MAX_FRAMES = 1500  # MusicGen was trained on 30 s windows: the context, the separator and the stem share them


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="", help="text description of the stem (or of the music), free text")
    p.add_argument("--genres", help="comma list: builds the official STAGE caption 'Genres: a, b. Moods: x. ' "
                                    "(Discogs names, e.g. 'Rock, Indie Rock'); instead of --prompt")
    p.add_argument("--moods", help="comma list for the caption's 'Moods: ...' part (MTG-Jamendo moods, e.g. 'energetic, happy')")
    p.add_argument("--out", required=True, help="output audio file (.wav or .flac)")
    p.add_argument("--context", help="STAGE: audio to accompany (any format soundfile reads)")
    p.add_argument("--bpm", type=float, help="STAGE: accompany a click track at this tempo instead")
    p.add_argument("--beats-per-bar", type=int, default=4, help="click track: beats per bar (louder downbeats)")
    p.add_argument("--offset", type=float, default=0.0, help="click track: time of the first click in seconds")
    p.add_argument("--mix-out", help="also write context + stem, as long as the stem")
    p.add_argument("--duration", type=float, help="seconds to generate (default: the context's length; 5 s for text alone)")
    p.add_argument("--model", default="facebook/musicgen-small", help="model folder, checkpoint file or hub id")
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


def check_options(args):
    """Everything that can be checked without loading a model, so that bad input fails at once."""
    sampling_config(args).check()
    if args.prompt and (args.genres is not None or args.moods is not None):
        raise ValueError("give --prompt (free text) or --genres/--moods (the STAGE caption form), not both")
    if args.genres is not None or args.moods is not None:
        args.prompt = stage_caption(args.genres, args.moods)
        print(f"caption: {args.prompt!r}", file=sys.stderr)
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
    check_writable(args.out)
    if args.mix_out:
        check_writable(args.mix_out)


def read_context(args) -> np.ndarray | None:
    """The context as mono 32 kHz audio: a file, a click track, or None for text alone."""
    if args.context:
        audio = load_audio(args.context, SAMPLE_RATE)
        if len(audio) < SAMPLE_RATE // FRAME_RATE:
            raise AudioError(f"{args.context}: too short ({len(audio) / SAMPLE_RATE * 1000:.1f} ms; at least 20 ms)")
        if np.abs(audio).max() < 1e-4:
            raise AudioError(f"{args.context}: the audio is silent")
        return audio
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
    if args.duration is None:  # as long as the context, as much as fits next to it
        n_frames = kept = min(context_frames, (MAX_FRAMES - 1) // 2)
        cut = kept < context_frames
    else:
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


def run(args):
    check_options(args)
    context = read_context(args)
    n_frames, context_frames = plan_frames(args, context)

    import torch  # heavy imports only once the input is known to be good

    from stage_min.pipeline import MusicGen

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    sampling = sampling_config(args)
    model = MusicGen.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype), stage=context is not None, t5=args.t5)
    if context is None:
        audio, _ = model.generate([args.prompt], n_frames, sampling, seed=args.seed, progress=True, compile=args.compile)
    else:
        if model.context_token_added:
            print(f"warning: {args.model} is a plain MusicGen, not a STAGE model: its context token is untrained, "
                  "so the stem will not follow the context", file=sys.stderr)
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
