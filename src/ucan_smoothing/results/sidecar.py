"""The JSON sidecar beside every result file: the run's config, its columns and its provenance.

``<file>.json`` holds the config, the columns and, for every start or resume,
the command line and library versions. It is always replaced atomically, and
written before the data file, so a result file never exists without it.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

from ..allocator import malloc_state
from ..fileio import atomic_write_text
from .schema import ResultFileError

FORMAT = "ucan-results-v1"

#: config keys that do not change the results, so a resume may change them
NON_IDENTITY_KEYS = ("out", "output", "progress", "resume", "log_every", "num_workers")
# For per-image result files (certify, attack): a row depends only on the config and its image
# (each image draws its noise from a generator seeded by (seed, idx)), so the device and how
# many images are asked for (``max``) may change on resume; a larger --max extends a file. The
# device and the weights' memory layout (channels_last) change the logits by rounding only.
PER_IMAGE_NON_IDENTITY_KEYS = ("out", "progress", "device", "channels_last", "max")


def sidecar_path(path) -> Path:
    return Path(f"{path}.json")


def _version(distribution: str):
    # From the installed metadata: importing torch only to read its version costs seconds.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def run_environment() -> dict:
    """Command line, time and versions, recorded in the sidecar at every start or resume."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(sys.argv),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "ucan_smoothing": _version("ucan-smoothing"),
        "platform": platform.platform(),
        "host": platform.node(),
        "malloc": malloc_state(),
    }


def normalise_config(config: dict) -> dict:
    """``config`` as it reads back from JSON, so a stored and a new config compare equal."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    return json.loads(json.dumps(config, default=str, sort_keys=True))


def config_differences(old: dict, new: dict, ignore=NON_IDENTITY_KEYS, prefix: str = "") -> list:
    """Dotted names of the keys whose values differ (top-level ``ignore`` keys skipped)."""
    differing = []
    for key in sorted(set(old) | set(new)):
        if key in ignore:
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            differing += config_differences(a, b, (), f"{prefix}{key}.")
        elif a != b:
            differing.append(f"{prefix}{key}")
    return differing


def describe_differences(old: dict, new: dict, keys: list) -> str:
    def lookup(config, dotted):
        for part in dotted.split("."):
            config = config.get(part, "<absent>") if isinstance(config, dict) else "<absent>"
        return config

    return "; ".join(f"{key}: {lookup(old, key)!r} -> {lookup(new, key)!r}" for key in keys)


def read_sidecar(path) -> dict:
    """The sidecar of result file ``path``."""
    side = sidecar_path(path)
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultFileError(
            f"{path} has no sidecar {side.name}; it was not written by `ucan certify` "
            "(move it away or choose another output file)"
        ) from None
    except (OSError, ValueError) as error:
        raise ResultFileError(f"cannot read sidecar {side}: {error}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ResultFileError(f"{side} is not a {FORMAT} sidecar")
    return sidecar


def write_sidecar(path, sidecar: dict) -> None:
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
