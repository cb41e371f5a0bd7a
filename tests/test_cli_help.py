"""Every command-line tool's help: the python -m form, a default on every option, booleans as flags."""

from __future__ import annotations

import argparse
import re

import pytest

from shared.cli import HelpFormatter, add_bool, parse_bool


def _parsers():
    from infra import launch, upload
    from infra.twin import cli as twin
    from training_job import evaluate, train

    return {"training_job.train": train.build_parser(), "training_job.evaluate": evaluate.build_parser(),
            "infra.upload": upload.build_parser(), "infra.launch": launch.build_parser(),
            "infra.twin": twin.build_parser()}


PARSERS = _parsers()


def option_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Option -> its help line as printed (defaults filled in)."""
    fmt = parser._get_formatter()
    return {a.option_strings[-1]: " ".join(fmt._expand_help(a).split())
            for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_usage_names_the_python_m_form(module):
    assert PARSERS[module].format_usage().startswith(f"usage: python -m {module} ")


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_every_option_states_its_default_in_plain_words(module):
    helps = option_help(PARSERS[module])
    assert len(helps) >= 4
    for option, text in helps.items():
        assert re.search(r"default: \S|\(required\)$", text), f"{module} {option}: {text!r}"
        assert not re.search(r"contract \d|\bNone\b|\[\]|%\(", text), f"{module} {option}: {text!r}"
    help_text = PARSERS[module].format_help()
    assert "contract" not in help_text and "``" not in help_text


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_booleans_are_flags(module):
    for action in PARSERS[module]._actions:
        if action.type is parse_bool:  # a flag that also takes true/false, for SageMaker's --key value
            assert action.nargs == "?" and action.const is True, action.option_strings
        elif action.option_strings and action.dest != "help":
            assert not isinstance(action.default, bool) or action.nargs == 0, action.option_strings


def test_training_help_shows_the_default_recipes_values():
    from training_job.recipes import RECIPES

    helps = option_help(PARSERS["training_job.train"])
    cpu, gpu, quick = RECIPES["cpu"], RECIPES["gpu"], RECIPES["quick"]
    assert PARSERS["training_job.train"].get_default("recipe") == "cpu"
    assert helps["--epochs"].endswith(f"(default: {cpu['epochs']}; --recipe gpu: {gpu['epochs']}, quick: {quick['epochs']})")
    assert helps["--architecture"].endswith(f"(default: {cpu['architecture']}; --recipe quick: {quick['architecture']})")
    assert helps["--pretrained"].endswith("(default: true; --recipe quick: false)")
    assert helps["--tta"].endswith("(default: false)") and helps["--amp"].endswith("(default: true)")
    assert helps["--optimizer"].endswith("(default: adamw)")


def test_the_formatter_renders_flags_values_and_requirements():
    p = argparse.ArgumentParser(prog="python -m x", formatter_class=HelpFormatter)
    p.add_argument("--name", required=True, help="a name")
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--rate", type=float, default=0.5, help="50%% of it")
    p.add_argument("--where", help="a place (default: the current folder)")
    p.add_argument("--tag", action="append", default=[], help="a tag")
    add_bool(p, "--check", default=True, help="check")
    assert option_help(p) == {"--name": "a name (required)", "--fast": "go fast (default: off)",
                              "--rate": "50% of it (default: 0.5)", "--where": "a place (default: the current folder)",
                              "--tag": "a tag (default: none)", "--check": "check (default: true)"}
    args = p.parse_args(["--name", "n", "--check", "--tag", "a"])
    assert args.check is True and args.tag == ["a"]
    assert p.parse_args(["--name", "n", "--check", "off"]).check is False
    assert p.parse_args(["--name", "n", "--check=FALSE"]).check is False


@pytest.mark.parametrize(("text", "value"), [("true", True), ("True", True), ("1", True), ("yes", True),
                                             ("false", False), ("False", False), ("0", False), ("", False)])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


def test_parse_bool_refuses_other_words():
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
        parse_bool("maybe")
