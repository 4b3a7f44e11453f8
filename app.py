"""Web demo: upload a song (or set a tempo) in a browser page and hear a stem that plays along.

    pip install -e ".[app]"
    python app.py                                  # http://127.0.0.1:7860, the toy STAGE model
    python app.py --model runs/drums/best --port 8000

Generation runs one request at a time; other tabs wait in the queue. The page is served on this
machine only unless --host says otherwise.
"""
import signal
import sys

from stage_min.cli.options import OneLineParser


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--model", default="weights/stage-toy",
                   help="model shown first in the page: a STAGE folder or checkpoint file (any other can be typed in the page)")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for official STAGE checkpoints that do not bundle it (default: google-t5/t5-base)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens the page to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be in 1..65535, got {args.port}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        from stage_min.app.page import Generator, build_page, missing_model
    except ImportError as e:
        print(f"error: the web demo needs gradio ({e.name} is missing): pip install -e \".[app]\"", file=sys.stderr)
        sys.exit(2)
    missing = missing_model(args.model)
    if missing:  # not fatal: another model can be chosen in the page, which says the same
        print(f"warning: {missing}", file=sys.stderr)
    generator = Generator(t5=args.t5)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped server still removes its output folder
    try:
        build_page(generator, args.model).launch(server_name=args.host, server_port=args.port, share=False,
                                                 inbrowser=False, ssr_mode=False, mcp_server=False)
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
