"""Training options written once: a config dataclass field carries its default, its --help text and its
check, and train.py's parser is built from the fields.

    lr: float = option(1e-5, "AdamW learning rate", above(0))

A float option must be finite; its rule (if any) says what else it must be. Checks that tie two options
together stay in the config's own check().
"""
import argparse
import math
from dataclasses import MISSING, field, fields
from typing import Any, Callable, NamedTuple


class Rule(NamedTuple):
    ok: Callable[[Any], bool]  # NaN fails every comparison, so a rule written as one refuses it
    says: str  # what the value must be: "must be >= 1"


def at_least(low) -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low:g}")


def above(low) -> Rule:
    return Rule(lambda v: v > low, f"must be > {low:g}")


def within(low, high, closed: bool = True) -> Rule:
    if closed:
        return Rule(lambda v: low <= v <= high, f"must be in [{low:g}, {high:g}]")
    return Rule(lambda v: low <= v < high, f"must be in [{low:g}, {high:g})")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {', '.join(choices)}")


PROBABILITY = within(0, 1)
SEED = Rule(lambda v: 0 <= v <= 2**63 - 1, "must be in [0, 2^63 - 1]")


def option(default, help: str, rule: Rule | None = None, flag: str | None = None, choices: tuple | None = None):
    """A config field that is also a command-line option. flag: the option's name when it is not
    --field-name (a bool whose default is True is switched off by its flag, e.g. --no-augment)."""
    return field(default=default, metadata={"help": help, "rule": rule, "flag": flag, "choices": choices})


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One command-line option per option() field of config_class, with its default and help."""
    for f in fields(config_class):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(flag_of(f), dest=f.name, action="store_false" if default else "store_true", help=f.metadata["help"])
        else:
            kind = type(default)
            parser.add_argument(flag_of(f), dest=f.name, type=kind, default=default, help=f.metadata["help"],
                                choices=f.metadata["choices"])


def given_options(args: argparse.Namespace, config_class) -> dict:
    """{field: value} of config_class's options in parsed args."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if "help" in f.metadata}


def check_options(config) -> None:
    """Each option's own check; raises ValueError naming the option, its rule and the value."""
    for f in fields(config):
        if "help" not in f.metadata:
            continue
        value, rule = getattr(config, f.name), f.metadata["rule"]
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag_of(f)} must be a finite number, got {value:g}")
        if rule is not None and not rule.ok(value):
            shown = f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else value
            raise ValueError(f"{flag_of(f)} {rule.says}, got {shown}")
