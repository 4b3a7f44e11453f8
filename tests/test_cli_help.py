"""Every option of every command line has a help line, and --help shows each default that is not None."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from stage_min.cli.options import OneLineParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts at the repository root import as modules


def _entry_points():
    import app
    import bench
    import evaluate
    import sample
    import train
    from stage_min.train import beat_check
    from stage_min.io import convert
    from stage_min.toy import synth, tiny, recipe as toy

    return {"sample.py": sample.parse_args, "train.py": train.parse_args, "evaluate.py": evaluate.parse_args,
            "bench.py": bench.main, "app.py": app.parse_args, "stage_min.toy.synth": synth.main, "stage_min.toy.tiny": tiny.main,
            "stage_min.io.convert": convert.main, "stage_min.toy": toy.main, "stage_min.train.beat_check": beat_check.main}


class Built(Exception):
    def __init__(self, parser):
        self.parser = parser


def build_parser(entry, monkeypatch):
    """The parser a CLI builds, caught at its parse_args call (nothing after it runs)."""
    def catch(self, *args, **kwargs):
        raise Built(self)

    monkeypatch.setattr(OneLineParser, "parse_args", catch)
    with pytest.raises(Built) as caught:
        entry([])
    return caught.value.parser


def all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


@pytest.mark.parametrize("name", ["sample.py", "train.py", "evaluate.py", "bench.py", "app.py", "stage_min.toy.synth",
                                  "stage_min.toy.tiny", "stage_min.io.convert", "stage_min.toy", "stage_min.train.beat_check"])
def test_every_option_has_help_and_default(name, monkeypatch):
    parser = build_parser(_entry_points()[name], monkeypatch)
    parsers = list(all_parsers(parser))
    if name == "evaluate.py":
        assert len(parsers) == 5  # beats, tempo, accompany, context
    checked = 0
    for p in parsers:
        formatter = p._get_formatter()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {p.prog}: {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{label} has no help"
            shown = formatter._expand_help(action)
            flag = action.nargs == 0  # store_true and the like: the help says what the flag does
            if not flag and action.default is not None:
                assert "(default" in shown, f"{label}: --help does not show its default {action.default!r}: {shown!r}"
            checked += 1
    assert checked >= 2


def test_formatter_shows_default_and_description_as_written(monkeypatch):
    p = OneLineParser(prog="x", description="line one\n    indented line")
    p.add_argument("--n", type=int, default=3, help="how many")
    p.add_argument("--name", default=None, help="a name (default: none, nothing is named)")
    p.add_argument("--flag", action="store_true", help="a flag")
    text = p.format_help()
    assert "how many (default: 3)" in text
    assert "    indented line" in text  # raw description
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("command", [["train.py", "--help"], ["-m", "stage_min.io.convert", "--help"]])
def test_help_in_a_process(command):
    r = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(default:" in r.stdout and r.stderr == ""
