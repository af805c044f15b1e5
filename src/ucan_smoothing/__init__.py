"""ucan_smoothing: certified robustness by randomized smoothing with anisotropic noise.

Every radius the package reports is a proven certificate, except the ALM
figure (a volume-equivalent radius) and anything whose ``is_certificate`` is
False. See README.md and ../shared/DESIGN.md for the mathematics.

The public names below load on first use, so that ``import
ucan_smoothing.results`` (reading result files) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "Anisotropic": "core.anisotropic",
    "ABSTAIN": "core.certificate",
    "Certificate": "core.certificate",
    "FAMILIES": "core.noises",
    "ExpInf": "core.noises",
    "Gaussian": "core.noises",
    "Laplace": "core.noises",
    "Noise": "core.noises",
    "PowerLaw": "core.noises",
    "Uniform": "core.noises",
    "make_noise": "core.noises",
    "parse_norm": "core.norms",
    "CertifiedRegion": "core.regions",
    "Scaling": "core.regions",
    "Smooth": "core.smooth",
    "clopper_pearson_lower": "core.statistics",
    "clopper_pearson_upper": "core.statistics",
    "min_samples_to_certify": "core.statistics",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
