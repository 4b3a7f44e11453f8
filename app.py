"""Web demo: upload a song (or set a tempo) in a browser page and hear a stem that plays along.

    pip install -e ".[app]"
    python app.py                                  # http://127.0.0.1:7860, the toy STAGE model
    python app.py --model runs/drums --port 8000   # a train.py run folder: its latest checkpoint
    python app.py --model-root /data/models        # also offer the models in another folder

An uploaded song is accompanied whole, window by window (as sample.py does). The page loads models
only from weights/, runs/ and each --model-root; any other path typed into it is refused.
Generation runs one request at a time; other tabs wait in the queue. The page is served on this
machine only unless --host says otherwise.
"""
import signal
import sys
from pathlib import Path

from stage_min.cli.options import OneLineParser


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--model", default="weights/stage-toy",
                   help="model shown first in the page: a STAGE folder, train.py run folder or checkpoint file under "
                        "weights/, runs/ or a --model-root (others under them can be chosen in the page)")
    p.add_argument("--model-root", action="append", default=[], metavar="FOLDER",
                   help="a folder of models the page may load, besides weights/ and runs/ (repeatable)")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for official STAGE checkpoints that do not bundle it (default: google-t5/t5-base)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens the page to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be in 1..65535, got {args.port}")
    for root in args.model_root:
        if not Path(root).expanduser().is_dir():
            p.error(f"--model-root {root} is not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        from stage_min.app.page import Generator, build_page, missing_model
    except ImportError as e:
        print(f"error: the web demo needs gradio ({e.name} is missing): pip install -e \".[app]\"", file=sys.stderr)
        sys.exit(2)
    generator = Generator(t5=args.t5, roots=args.model_root)
    missing = missing_model(args.model, generator.roots)
    if missing:  # not fatal: another model can be chosen in the page, which says the same
        print(f"warning: {missing}", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server still removes its output folder
    try:
        page = build_page(generator, args.model)
        # quiet: gradio's own start-up lines (its advice to set share=True) are replaced by ours, once serving
        page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                    mcp_server=False, quiet=True, prevent_thread_lock=True)
        print(f"serving the page on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        page.block_thread()
    except OSError as e:  # the port is taken, or the address is not this machine's
        reason = str(e).split(". ")[0]  # gradio goes on with advice about its own parameters
        print(f"error: cannot serve on {args.host}:{args.port} ({reason})", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
    finally:
        generator.cleanup()


if __name__ == "__main__":
    main()
