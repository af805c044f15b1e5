"""The paper's input-dependent certification, kept as a labelled reproduction: NOT A CERTIFICATE.

Certifying with ``sigma(x), mu(x)`` computed from the clean input as if they
were fixed is not sound: at ``x + delta`` the smoothed classifier uses another
noise distribution, so Theorem 3.2 says nothing about it (DESIGN.md section 4;
:mod:`ucan_smoothing.npg.counterexamples` shows flips deep inside the claimed
regions). Every certificate of :class:`PaperModeSmooth` carries
``is_certificate=False``; it is never a default.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..core.anisotropic import Anisotropic
from ..core.certificate import Certificate
from ..core.noises import Noise
from ..core.smooth import Smooth
from ..core.streams import model_device, resolve_generator

NOT_A_CERTIFICATE = (
    "paper mode: sigma(x), mu(x) are computed from the clean input and treated as fixed; this reproduces "
    "the paper's numbers but is NOT a certificate (DESIGN.md section 4)"
)


class PaperModeSmooth:
    """The paper's input-dependent certification: NOT A CERTIFICATE.

    For each input ``x`` it evaluates the NPG on ``x``, freezes
    ``sigma(x), mu(x)`` into :class:`~ucan_smoothing.Anisotropic` noise and runs
    CERTIFY. The regions it reports are what the paper would claim; they are
    not proven (DESIGN.md section 4 shows flips deep inside them), so every
    certificate carries ``is_certificate=False``. Its smoothed classifier,
    used by ``predict`` and ``noisy_logits``, is the paper's:
    ``g(x) = argmax_c P(f(x + eps * sigma(x) + mu(x)) = c)``.

    ``npg`` maps a batch ``(B, *input_shape)`` to ``(sigma, mu)`` of the same
    shape (``mu`` may be None), e.g. an
    :class:`~ucan_smoothing.npg.generators.InputDependentGenerator`.
    """

    is_certificate = False

    def __init__(self, model: nn.Module, num_classes: int, base_noise: Noise, npg: Callable, *,
                 sigma_min: float = 1e-6, input_shape=None):
        if not isinstance(base_noise, Noise):
            raise TypeError(f"base_noise must be an isotropic noise family, got {type(base_noise).__name__}")
        self.model = model.eval()
        self.num_classes = num_classes
        self.base_noise = base_noise
        self.npg = npg.eval() if isinstance(npg, nn.Module) else npg
        self.sigma_min = sigma_min
        self.input_shape = None if input_shape is None else tuple(input_shape)

    @property
    def primary_norm(self) -> float:
        return self.base_noise.primary_norm

    def _parameters_at(self, x: torch.Tensor):
        x = x.to(model_device(self.npg, x.device))
        sigma, mu = self.npg(x[None])
        return sigma[0], (None if mu is None else mu[0])

    def noise_at(self, x: torch.Tensor) -> Anisotropic:
        """The noise the paper uses at ``x``: ``sigma(x), mu(x)`` frozen."""
        with torch.no_grad():
            sigma, mu = self._parameters_at(x)
        return Anisotropic(self.base_noise, sigma, mu, sigma_min=self.sigma_min)

    def smooth_at(self, x: torch.Tensor) -> Smooth:
        return Smooth(self.model, self.num_classes, self.noise_at(x), input_shape=self.input_shape)

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None,
                progress: bool = False) -> Certificate:
        """CERTIFY with the noise frozen at ``x``; the result is labelled NOT a certificate."""
        certificate = self.smooth_at(x).certify(x, n0, n, alpha, batch_size, generator, progress)
        return dataclasses.replace(certificate, is_certificate=False,
                                   extra={**certificate.extra, "mode": "paper", "note": NOT_A_CERTIFICATE})

    def certify_batch(self, xs, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None) -> list:
        rng = resolve_generator(generator, model_device(self.model, xs.device))
        return [self.certify(x, n0, n, alpha, batch_size, rng) for x in xs]

    def predict(self, x, n: int, alpha: float, batch_size: int = 1000, generator=None) -> int:
        """PREDICT for the paper's smoothed classifier at ``x`` (its own ``sigma(x), mu(x)``)."""
        return self.smooth_at(x).predict(x, n, alpha, batch_size, generator)

    def noisy_logits(self, x: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        """Logits of ``num`` draws of ``f(x + eps * sigma(x) + mu(x))``, differentiable in ``x``
        (through the generator too)."""
        sigma, mu = self._parameters_at(x)
        eps = self.base_noise.sample((num, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        noisy = x + eps * sigma
        return self.model(noisy if mu is None else noisy + mu)
