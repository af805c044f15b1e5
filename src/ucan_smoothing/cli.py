"""The ``ucan`` command: ``ucan <command> [options]``.

Each command lives in its own module that defines ``configure(parser)`` (add
the command's options) and ``run(args) -> int`` (do the work, return an exit
status). Adding a command is adding a module and a line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

#: command name -> (module, one-line help)
COMMANDS = {
    "demo": ("ucan_smoothing.commands.demo", "isotropic vs UCAN noise on MNIST in minutes: train, certify, compare"),
    "train": ("ucan_smoothing.commands.train", "train a base classifier or a noise parameter generator"),
    "certify": ("ucan_smoothing.commands.certify", "certify a trained run on a data split (resumable)"),
    "analyze": ("ucan_smoothing.commands.analyze", "tables and plots from result files"),
    "bench": ("ucan_smoothing.commands.bench", "throughput benchmark of certification"),
    "attack": ("ucan_smoothing.commands.attack", "search certified regions for counterexamples"),
}


def _available_commands():
    for name, (module_name, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module_name) is not None:
            yield name, module_name, help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ucan",
        description="Certified robustness by randomized smoothing with anisotropic noise (UCAN).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, module_name, help_text in _available_commands():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__.strip().splitlines()[0])
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        print("interrupted; finished work is saved", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        print(f"ucan {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
