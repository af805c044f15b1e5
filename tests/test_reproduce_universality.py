"""scripts/reproduce_universality.py: the ALM column sits in the table of the norm it measures."""

import math
import sys
from pathlib import Path

import pytest

from ucan_smoothing.core.certificate import Certificate
from ucan_smoothing.core.noises import make_noise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import reproduce_universality as universality  # noqa: E402


@pytest.mark.parametrize("family", sorted(universality.FAMILIES))
def test_alm_column_is_in_the_table_of_its_norm(family):
    norms, scale_of = universality.FAMILIES[family]
    params = {"a": universality.POWER_A} if family == "powerlaw" else {}
    noise = make_noise(family, scale_of(1.0), **params)
    shape = (universality.DIM,)
    certificate = Certificate(prediction=0, p_lower=0.9, norm=noise.primary_norm, regions=noise.regions(0.9, shape))
    column = universality.alm_norm(family)
    assert column in norms
    # isotropic noise: the ALM is the certified radius in its own norm, and only there
    assert math.isclose(certificate.alm, certificate.radius(column), rel_tol=1e-12)
    for other in set(norms) - {column}:
        assert not math.isclose(certificate.alm, certificate.radius(other), rel_tol=1e-3)
