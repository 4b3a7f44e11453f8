"""What every command line of the project shares: one-line usage errors and a --help that shows defaults.

Light on purpose (argparse only): sample.py imports it before torch, so that --help and bad options answer at once.
"""
import argparse
import contextlib
import sys
import warnings


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit code 2 (argparse prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default after its help. Left out where the
    default says nothing: flags (on/off switches), options without a default (None, "": the help says what
    then happens) and helps that already name their default."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.nargs == 0 or action.default is None or action.default in ("", argparse.SUPPRESS) or "(default" in help:
            return help
        return super()._get_help_string(action)


def add_sampling_options(p: argparse.ArgumentParser):
    """--cfg/--top-k/--top-p/--temperature, each None unless given: then the model's own setting is used
    (config.json's "sampling", else MusicGen's 3.0, 250, 0, 1.0; the toy's temperature is 0.6)."""
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance coefficient (1 = off; default: the model's, 3.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely codes (0 = off; default: the model's, 250)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (0 = off; default: the model's, 0)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (< 1: safer, > 1: more varied; "
                   "default: the model's, 1.0; the toy's config.json sets the one it was measured best with)")


def sampling_given(args) -> dict:
    """The sampling settings given on the command line, in SamplingConfig's names (the rest: the model's own)."""
    given = dict(cfg_coef=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    return {k: v for k, v in given.items() if v is not None}


def check_sampling(args):
    """The settings given are in range (before any model loads: a bad one fails at once)."""
    from dataclasses import replace

    from ..generate import SamplingConfig

    replace(SamplingConfig(), **sampling_given(args)).check()


@contextlib.contextmanager
def warnings_via_tqdm():
    """Python warnings (librosa's, torch's) printed with tqdm.write while this lasts: above an active
    progress bar, never onto its line. Restored on exit."""
    from tqdm import tqdm

    def show(message, category, filename, lineno, file=None, line=None):
        tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
