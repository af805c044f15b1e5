"""Binomial statistics of Cohen et al.'s CERTIFY and PREDICT (DESIGN.md section 5)."""

from __future__ import annotations

import math

from scipy.stats import beta, binomtest


def check_alpha(alpha) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    return alpha


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` lower confidence bound on a binomial proportion."""
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` upper confidence bound on a binomial proportion."""
    if successes == trials:
        return 1.0
    return float(beta.ppf(1 - alpha, successes + 1, trials - successes))


def min_samples_to_certify(alpha: float) -> int:
    """Smallest ``n`` whose best case (all ``n`` votes for one class) certifies.

    With ``k = n`` the lower bound is ``alpha^(1/n)``, which must exceed 1/2.
    """
    alpha = check_alpha(alpha)
    return math.floor(math.log2(1 / alpha)) + 1


def check_can_certify(n: int, alpha: float) -> None:
    """Raise a clear error when ``n`` samples can never give ``p_lower > 1/2``."""
    needed = min_samples_to_certify(alpha)
    if n < needed:
        raise ValueError(
            f"n={n} is too small to certify anything at alpha={alpha}: even if every sample "
            f"votes for the same class the lower bound stays <= 1/2; use n >= {needed}"
        )


def predict_is_significant(top_count: int, runner_up_count: int, alpha: float) -> bool:
    """PREDICT's test: is the top class significantly ahead of the runner-up?"""
    total = top_count + runner_up_count
    if total == 0:
        return False
    return binomtest(top_count, total, 0.5).pvalue <= alpha
