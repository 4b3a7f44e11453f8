"""Convert a checkpoint of any supported layout into ours or transformers'; or show what one holds.

    python -m stage_min.io.convert SRC DST [--to native|hf] [--t5 T5_FOLDER_OR_HUB_ID]
    python -m stage_min.io.convert --info SRC

SRC: a transformers, stage_min or audiocraft folder, an official STAGE checkpoint file (the released
safetensors, or a training `.ckpt` of the original code), or a hub id. DST: a new folder, written
under a temporary name and renamed when complete. --info prints the layout, the LM's sizes read off
the weights and, for an original training `.ckpt`, its hyper-parameters as plain data (read with
no code execution: stage_min.io.lightning_ckpt). Errors: one line on stderr, exit code 2.
"""
import json
import sys

from ..cli.options import OneLineParser
from .formats import check_new_folder, detect_layout, export_hf, export_native
from .loading import LoadError


def info(src: str) -> dict:
    """What a checkpoint holds, as plain data; reads weights only to size the LM (no T5 or codec built)."""
    from dataclasses import asdict

    from .formats import _file_kind, lm_config_from_stage, read_weights_file
    from .lightning_ckpt import is_lightning_ckpt, restricted_torch_load, summary
    from .loading import lm_config_from_hf, lm_config_from_native, read_config

    layout, path = detect_layout(src)
    out = {"layout": layout, "path": str(path)}
    if layout == "stage":
        out["lm_from_weights"] = asdict(lm_config_from_stage(read_weights_file(path)))
        kind = _file_kind(path)
        if kind in ("torch-zip", "pickle"):
            pkg = restricted_torch_load(path, mmap=kind == "torch-zip")
            if is_lightning_ckpt(pkg):
                out["lightning"] = summary(pkg)
    elif layout == "native":
        out["lm"] = asdict(lm_config_from_native(read_config(path)))
    elif layout == "hf":
        out["lm"] = asdict(lm_config_from_hf(read_config(path)))
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stage_min.io.convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="checkpoint folder, STAGE checkpoint file (.safetensors, .pt, or a training .ckpt), or hub id")
    p.add_argument("dst", nargs="?", help="output folder (must not exist, or be empty); not with --info")
    p.add_argument("--to", choices=["native", "hf"], default="native", help="native: stage_min, self-contained; hf: transformers' MusicGen")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for audiocraft and STAGE sources (default: google-t5/t5-base)")
    p.add_argument("--info", action="store_true", help="print the layout, LM sizes and (original .ckpt) hyper-parameters as JSON; write nothing")
    args = p.parse_args(argv)
    if args.info == (args.dst is not None):
        p.error("give DST to convert, or --info without DST")
    try:
        if args.info:
            print(json.dumps(info(args.src), indent=2, default=str))
            return 0
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
