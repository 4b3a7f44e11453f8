"""Generate music from a text prompt.

    python sample.py --prompt "lofi hip hop beat" --duration 5 --out music.wav
"""
import argparse
import sys

import torch

from stage_min.audio import AudioError, check_writable, save_audio
from stage_min.generate import SamplingConfig
from stage_min.loading import LoadError
from stage_min.pipeline import MusicGen

MAX_SECONDS = 30.0  # MusicGen was trained on 30 s windows


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="", help="text description of the music")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of audio to generate")
    p.add_argument("--out", required=True, help="output audio file (.wav or .flac)")
    p.add_argument("--model", default="facebook/musicgen-small", help="model folder or hub id")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance coefficient (1 = off)")
    p.add_argument("--top-k", type=int, default=250, help="sample from the k most likely codes (0 = off)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold (0 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    return p.parse_args(argv)


def run(args):
    sampling = SamplingConfig(cfg_coef=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    sampling.check()
    if not 0 < args.duration <= MAX_SECONDS:
        raise ValueError(f"--duration must be in (0, {MAX_SECONDS:g}] seconds, got {args.duration:g}")
    check_writable(args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    model = MusicGen.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    n_frames = max(1, round(args.duration * model.codec.frame_rate))
    audio, _ = model.generate([args.prompt], n_frames, sampling, seed=args.seed, progress=True, compile=args.compile)
    save_audio(args.out, audio[0, 0].cpu().numpy(), model.sample_rate)
    print(f"wrote {args.out}: {audio.shape[-1] / model.sample_rate:.2f} s at {model.sample_rate} Hz")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (LoadError, AudioError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
