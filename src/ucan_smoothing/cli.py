"""The ``ucan`` command: ``ucan <command> [options]``.

Each command lives in its own module that defines ``configure(parser)`` (add
the command's options) and ``run(args) -> int`` (do the work, return an exit
status). Adding a command is adding a module and a line to ``COMMANDS``.

A user's mistake or an environment the work cannot run in (a bad option or
file, a full or read-only disk, a batch too large for memory, processes that
never joined) ends with one line ``ucan COMMAND: error: ...`` and exit status
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.util
import sys

from .allocator import tune_malloc

#: command name -> (module, one-line help)
COMMANDS = {
    "demo": ("ucan_smoothing.commands.demo", "isotropic vs UCAN noise on MNIST in minutes: train, certify, compare"),
    "train": ("ucan_smoothing.commands.train", "train a base classifier or a noise parameter generator"),
    "train-dual": ("ucan_smoothing.commands.train_dual", "train the noise selector of a dual-smoothing run (sound)"),
    "certify": ("ucan_smoothing.commands.certify", "certify a model on a data split (resumable)"),
    "predict": ("ucan_smoothing.commands.predict", "Cohen's PREDICT on a data split (resumable)"),
    "analyze": ("ucan_smoothing.commands.analyze", "tables and plots from result files"),
    "bench": ("ucan_smoothing.commands.bench", "throughput benchmark of certification"),
    "attack": ("ucan_smoothing.commands.attack", "search certified regions for counterexamples"),
}
#: commands that compute with torch: each takes ``--threads N`` (added here unless it has its own)
COMPUTE_COMMANDS = ("demo", "train", "train-dual", "certify", "bench", "attack", "predict")
#: errors of writing a file: "cannot write PATH: ..."
_WRITE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EFBIG, errno.EEXIST,
                 errno.ENOTDIR}
#: errors of opening a path the user named: "cannot open PATH: ..."
_OPEN_ERRNOS = {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (unless the text already says it, or there is none,
    or the option is a plain flag such as ``--no-progress``, whose default would read as its effect);
    descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = isinstance(action, argparse._StoreConstAction)  # store_true / store_false
        if flag or action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


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
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__.strip().splitlines()[0],
                                    formatter_class=HelpFormatter)
        module.configure(sub)
        if name in COMPUTE_COMMANDS and not any("--threads" in a.option_strings for a in sub._actions):
            sub.add_argument("--threads", type=int, default=None,
                             help="CPU threads of torch (default: torch's, which follows OMP_NUM_THREADS)")
        sub.set_defaults(_run=module.run)
    return parser


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` for the command, when asked (never otherwise), then as before."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)  # process-wide: main() called from Python leaves it as found


def _os_error_message(error: OSError) -> str | None:
    """One line for a path that cannot be written or opened (None: not such an error)."""
    path = error.filename if error.filename is not None else error.filename2
    where = "" if path is None else f" {str(path)!r}"
    reason = error.strerror or str(error)
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        reason += " (a part of that path is a file, not a folder)"
    if error.errno in _WRITE_ERRNOS:
        return f"cannot write{where}: {reason}"
    if error.errno in _OPEN_ERRNOS:
        return f"cannot open{where}: {reason}"
    return None


def _runtime_error_message(error: RuntimeError, args) -> str | None:
    """One line for running out of memory or processes that never joined (None: another error, a bug)."""
    import torch

    from .distributed import DistributedSetupError

    if isinstance(error, DistributedSetupError):
        return str(error)
    text = str(error)
    on_gpu = isinstance(error, torch.OutOfMemoryError)
    if not (on_gpu or "DefaultCPUAllocator" in text or "can't allocate memory" in text
            or "not enough memory" in text or "out of memory" in text.lower()):
        return None
    batch = getattr(args, "batch_size", None)
    hint = (f": lower --batch-size (now {batch})" if batch is not None
            else ": lower --batch-size" if hasattr(args, "batch_size") else "")
    return f"a batch does not fit in {'GPU ' if on_gpu else ''}memory{hint}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in COMPUTE_COMMANDS:
        tune_malloc()  # batch speed independent of what ran before (allocator.py)
    try:
        with _torch_threads(getattr(args, "threads", None)):
            return args._run(args) or 0
    except KeyboardInterrupt:
        print("interrupted; finished work is saved", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
    except OSError as error:
        message = _os_error_message(error)
        if message is None:
            raise
    except RuntimeError as error:
        message = _runtime_error_message(error, args)
        if message is None:
            raise
    print(f"ucan {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
