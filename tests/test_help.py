"""Every command's help: each option says what it does and, where it has one, its default."""

import argparse

import pytest

from ucan_smoothing.cli import COMMANDS, build_parser


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    sub = subparsers()[name]
    text = sub.format_help()
    for action in sub._actions:
        if action.dest in ("help", "_train_parser") or action.default is argparse.SUPPRESS:
            continue
        assert action.help, f"ucan {name} {action.option_strings or action.dest}: no help text"
        flag = isinstance(action, argparse._StoreConstAction)  # its default would read as its effect
        if action.default is not None and action.option_strings and not flag:
            shown = sub._get_formatter()._get_help_string(action)
            assert "default" in shown, f"ucan {name} {action.option_strings[0]}: its default is not shown"
    assert "default" in text


def test_the_torchrun_example_keeps_torchrun_off_our_options():
    epilog = subparsers()["train"].epilog
    assert "torchrun --nproc_per_node=2 -m -- ucan_smoothing.cli train" in epilog
