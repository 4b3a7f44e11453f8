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
    default says nothing: flags (False), options without a default (None, "": the help says what
    then happens) and helps that already name their default."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS) or "(default" in help:
            return help
        return super()._get_help_string(action)


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
