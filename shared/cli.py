"""Conventions shared by the command-line tools: help that states every default, and booleans.

Every option's help line ends with its default (``(default: 8)``, ``(default: off)`` for a flag,
``(required)``), unless the help text already says it in words (``default: the stack's
TrainingImage output``). Booleans are flags that also take an explicit value, because SageMaker
passes every hyperparameter as a ``--key value`` string: ``--tta``, ``--tta true`` and
``--tta false`` all work.
"""

from __future__ import annotations

import argparse
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off, any case; empty is false) as a bool.

    Raises :class:`argparse.ArgumentTypeError` (argparse reports it as a usage error) for any other text.
    """
    t = str(text).strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def shown_default(value: Any) -> str:
    """A default as the help shows it: true/false, ``none`` for nothing, else the value as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or (isinstance(value, list | tuple | dict) and not value):
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def add_bool(parser: argparse.ArgumentParser | Any, *names: str, default: bool | None, help: str) -> argparse.Action:  # noqa: A002
    """A boolean option: ``--name`` alone sets true; ``--name true|false`` (or ``--name=false``) sets either."""
    return parser.add_argument(*names, nargs="?", const=True, default=default, type=parse_bool, metavar="BOOL",
                               help=help)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends each option's help with ``(default: ...)``, ``(default: off)`` for a flag or ``(required)``.

    Help that already contains ``default:`` is left as written (a default in words).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS or "%(default)" in text
                or "default:" in text):
            return text
        if action.required:
            return f"{text} (required)".strip()
        if action.nargs == 0:  # a flag: store_true, store_const, ...
            shown = "on" if action.default == action.const else "off"
        else:
            shown = shown_default(action.default).replace("%", "%%")
        return f"{text} (default: {shown})".strip()
