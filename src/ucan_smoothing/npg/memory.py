"""Memory-based certification: a guarantee about a SEQUENCE OF QUERIES, not a certificate of a classifier.

The fix that Alfarra et al. (data-dependent smoothing, 2022) propose for input-dependent noise,
and that ANCER's package leaves out: a stateful system answers queries ``x_1, x_2, ...`` in
order with an input-dependent mode (here the paper's: ``sigma(x), mu(x)`` frozen at ``x``) and
keeps a memory of every answer it gave, ``(x_i, c_i, R_i)`` with ``R_i`` the region it issued
around ``x_i``. For the query ``x_t``, with the mode's answer ``(c_t, R_t)``:

1. if ``x_t`` lies in an issued region ``R_i`` with ``c_i != c_t``, it ABSTAINS (a conflict);
2. else every earlier answered ``x_i`` with ``c_i != c_t`` that lies in ``R_t`` is put outside
   it: ``R_t``'s radius is cut to just below that point's scaled distance (shrunk);
3. it stores ``(x_t, c_t, R_t)`` and answers.

The guarantee (deterministic, whatever the noise draws): for any two answered queries ``i < t``
of the same memory, ``x_t`` lies in ``R_i`` only if ``c_t = c_i`` (step 1), and ``x_i`` lies in
``R_t`` only if ``c_i = c_t`` (step 2). So an adversary who moves an answered input anywhere in
the region the system issued for it, and asks the SAME system (the memory kept, queries in
order), gets the issued class or an abstention, never another class.

What it does NOT say: nothing about the smoothed classifier at points nobody asked, nothing
about a fresh system without this memory, and nothing about the regions being certificates of
the input-dependent classifier (they are not: DESIGN.md section 4). Rows stay
``is_certificate = false``. On a test set whose points are far apart the memory rarely acts
(the ``memory`` column counts it); its work is done when attacked points arrive as queries.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..core.certificate import ABSTAIN, Certificate
from ..core.regions import CertifiedRegion, Scaling
from ..results import MEMORY_COLUMNS

#: the ``memory`` column: what the memory did to the row
MEMORY_OK, MEMORY_CONFLICT, MEMORY_SHRUNK = "ok", "conflict", "shrunk"


@dataclasses.dataclass
class Answer:
    """One answered query of the memory: its point (flat, float64), class and issued regions."""

    point: torch.Tensor
    cls: int
    regions: tuple

    def contains(self, point: torch.Tensor) -> bool:
        return any(region.contains(point - self.point) for region in self.regions)

    def to_state(self) -> dict:
        return {"point": self.point, "cls": self.cls,
                "regions": [{"norm": _json_norm(r.norm), "radius_scaled": r.radius_scaled,
                             "sigma": r.scaling.sigma, "dim": r.scaling.dim} for r in self.regions]}

    @classmethod
    def from_state(cls, state: dict) -> "Answer":
        regions = tuple(
            CertifiedRegion(float(r["norm"]), float(r["radius_scaled"]),
                            Scaling.isotropic(r["dim"]) if r["sigma"] is None else Scaling.from_sigma(r["sigma"]))
            for r in state["regions"])
        return cls(state["point"].to(torch.float64), int(state["cls"]), regions)


def _json_norm(norm: float):
    return "inf" if math.isinf(norm) else norm


def _shrunk_below(region: CertifiedRegion, delta: torch.Tensor) -> CertifiedRegion:
    """``region`` with its radius cut so that ``delta`` lies strictly outside (if it was inside)."""
    distance = region.scaled_norm(delta)
    if distance > region.radius_scaled:
        return region
    return CertifiedRegion(region.norm, math.nextafter(distance, 0.0) if distance > 0 else 0.0, region.scaling)


class MemorySmooth:
    """An input-dependent mode (``inner``: anything with ``certify``) answering through a memory
    (module docstring). ``certify`` must be called in query order; ``answers`` is the memory.
    NOT a certificate: every certificate it returns has ``is_certificate = False``."""

    is_certificate = False
    row_columns = MEMORY_COLUMNS

    def __init__(self, inner, answers=()):
        self.inner = inner
        self.answers = list(answers)
        self.model = getattr(inner, "model", None)
        # bookkeeping of a caller that resumes (ucan certify): the query index of each answer, and of every query
        self.indices, self.queried = [], []

    @property
    def primary_norm(self) -> float:
        return self.inner.primary_norm

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None,
                progress: bool = False) -> Certificate:
        answer = self.inner.certify(x, n0, n, alpha, batch_size, generator, progress)
        point = x.detach().to("cpu", torch.float64).reshape(-1)
        if answer.abstained:
            return self._labelled(answer, MEMORY_OK)
        if any(old.cls != answer.prediction and old.contains(point) for old in self.answers):
            return self._labelled(dataclasses.replace(answer, prediction=ABSTAIN, regions=()), MEMORY_CONFLICT)
        regions = answer.regions
        for old in self.answers:
            if old.cls != answer.prediction:
                regions = tuple(_shrunk_below(region, old.point - point) for region in regions)
        status = MEMORY_OK if regions == answer.regions else MEMORY_SHRUNK
        regions = tuple(region for region in regions if region.radius_scaled > 0)
        self.answers.append(Answer(point, int(answer.prediction), regions))
        return self._labelled(dataclasses.replace(answer, regions=regions), status)

    @staticmethod
    def _labelled(certificate: Certificate, status: str) -> Certificate:
        return dataclasses.replace(certificate, is_certificate=False,
                                   extra={**certificate.extra, "memory": status})

    def predict(self, x, n: int, alpha: float, batch_size: int = 1000, generator=None) -> int:
        """The inner PREDICT, abstaining when ``x`` lies in an issued region of another class."""
        prediction = self.inner.predict(x, n, alpha, batch_size, generator)
        point = x.detach().to("cpu", torch.float64).reshape(-1)
        if prediction != ABSTAIN and any(old.cls != prediction and old.contains(point) for old in self.answers):
            return ABSTAIN
        return prediction

    def noisy_logits(self, x: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        """The inner classifier's (attacks search the inner mode; PREDICT above adds the memory)."""
        return self.inner.noisy_logits(x, num, generator)

    def state(self) -> dict:
        return {"answers": [answer.to_state() for answer in self.answers]}

    @staticmethod
    def answers_from_state(state: dict) -> list:
        return [Answer.from_state(entry) for entry in state["answers"]]
