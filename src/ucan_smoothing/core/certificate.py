"""What CERTIFY returns: the certified regions of one input and how they were obtained."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .norms import NORMS, norm_name
from .regions import CertifiedRegion

#: returned by ``predict`` (and stored in ``Certificate.prediction``) on abstention
ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """The outcome of CERTIFY for one input.

    ``regions`` are the certified sets ``{||delta / sigma||_p <= R}``, one per
    native norm of the noise (empty on abstention); each is certified, so
    ``radius(q)`` is the radius of the largest ``lq`` ball inside any one of
    them. ``alm`` is the paper's volume figure and is NOT a certified radius. ``is_certificate`` is False
    for anything that is not a proven guarantee.
    """

    prediction: int
    p_lower: float
    norm: float  # primary native norm of the noise
    regions: tuple = ()
    is_certificate: bool = True
    n0: int = 0
    n: int = 0
    alpha: float = 0.0
    top_count: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def radius(self, norm=None) -> float:
        """Certified radius in ``norm`` (default: the native norm); 0 on abstention."""
        norm = self.norm if norm is None else norm
        return max((region.radius(norm) for region in self.regions), default=0.0)

    def radii(self) -> dict:
        """``{'l1': r1, 'l2': r2, 'linf': rinf}``."""
        return {norm_name(q): self.radius(q) for q in NORMS}

    @property
    def alm(self) -> float:
        """The paper's ALM in the native norm: a volume-equivalent radius, NOT a certificate."""
        primary = [region for region in self.regions if region.norm == self.norm]
        return primary[0].alm if primary else 0.0

    def contains(self, delta) -> bool:
        """True when ``x + delta`` is certified to keep the prediction."""
        return any(region.contains(delta) for region in self.regions)


def scale_radii(certificate: Certificate, factors: dict) -> Certificate:
    """``certificate`` with each region's radius multiplied by ``factors[norm]``
    (regions of norms without a factor are dropped: nothing is proven for them)."""
    regions = tuple(
        CertifiedRegion(region.norm, region.radius_scaled * factors[region.norm], region.scaling)
        for region in certificate.regions
        if region.norm in factors
    )
    return dataclasses.replace(certificate, regions=regions)
