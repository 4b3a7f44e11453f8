"""Convert a checkpoint of any supported layout into ours or transformers'.

    python -m stage_min.io.convert SRC DST [--to native|hf] [--t5 T5_FOLDER_OR_HUB_ID]

SRC: a transformers, stage_min or audiocraft folder, an official STAGE checkpoint file, or a hub id.
DST: a new folder, written under a temporary name and renamed when complete. Errors: one line on
stderr, exit code 2.
"""
import sys

from ..cli.options import OneLineParser
from .formats import check_new_folder, export_hf, export_native
from .loading import LoadError


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stage_min.io.convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="checkpoint folder, STAGE checkpoint file, or hub id")
    p.add_argument("dst", help="output folder (must not exist, or be empty)")
    p.add_argument("--to", choices=["native", "hf"], default="native", help="native: stage_min, self-contained; hf: transformers' MusicGen")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for audiocraft and STAGE sources (default: google-t5/t5-base)")
    args = p.parse_args(argv)
    try:
        from ..io.pretrained import from_pretrained

        check_new_folder(args.dst)
        model = from_pretrained(args.src, t5=args.t5)
        (export_native if args.to == "native" else export_hf)(model, args.dst)
    except (LoadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"{model.layout} -> {args.to}: {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
