"""Norm names and the inscribed-ball rule shared by every certificate.

Norms are written 1, 2 or ``math.inf`` everywhere in the package; users may
also pass ``"l1"``, ``"l2"``, ``"linf"``, ``"inf"`` or ``float("inf")``.
"""

from __future__ import annotations

import math

NORMS = (1, 2, math.inf)

_NAMES = {
    "1": 1, "l1": 1,
    "2": 2, "l2": 2,
    "inf": math.inf, "linf": math.inf, "l_inf": math.inf, "infinity": math.inf,
}


def parse_norm(norm) -> float:
    """Return ``norm`` as 1, 2 or ``math.inf``; raise ``ValueError`` otherwise."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        if key in _NAMES:
            return _NAMES[key]
    elif not isinstance(norm, bool) and isinstance(norm, (int, float)) and norm in NORMS:
        return math.inf if math.isinf(norm) else int(norm)
    raise ValueError(f"unknown norm {norm!r}: use 1, 2 or inf (or 'l1', 'l2', 'linf')")


def norm_name(norm) -> str:
    """``'l1'``, ``'l2'`` or ``'linf'``: the name used in result files."""
    norm = parse_norm(norm)
    return "linf" if math.isinf(norm) else f"l{norm}"


def holder_exponent(p: float, q: float) -> float:
    """The ``t`` with ``1/t = 1/p - 1/q`` (for ``q > p``).

    ``sup{ ||v / sigma||_p : ||v||_q <= 1 } = ||1 / sigma||_t`` by Hoelder's
    inequality; for our norms ``t`` is 1 or 2.
    """
    inv = 1.0 / p - (0.0 if math.isinf(q) else 1.0 / q)
    return 1.0 / inv
