"""Sound: ``mu`` computed from the NOISY sample, ``f(z + mu(z))`` under FIXED noise.

That is just another base classifier, so certifying it with fixed noise (plain
:class:`~ucan_smoothing.Smooth`) is Theorem 3.2 unchanged: nothing about the
shift network needs to be bounded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .generators import ConvGenerator


class NoisyInputShift(nn.Module):
    """The base classifier ``z -> model(z + mu_net(z))``, for ``mu`` computed from the NOISY sample.

    Smoothing it with FIXED noise is ordinary randomized smoothing of another
    base classifier, so ``Smooth(NoisyInputShift(model, mu_net), num_classes,
    noise)`` gives proven certificates (Theorem 3.2 needs nothing of the base
    classifier). ``mu_net`` maps a batch to a batch of the same shape.
    """

    def __init__(self, model: nn.Module, mu_net: nn.Module):
        super().__init__()
        self.model = model
        self.mu_net = mu_net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z + self.mu_net(z))


class NoisyShiftNet(nn.Module):
    """A ``mu`` network for :class:`NoisyInputShift`: ``z -> gamma * tanh(G(z))`` on the NOISY sample.

    ``G`` is the conv generator of :mod:`ucan_smoothing.npg.generators` (conv +
    leaky-ReLU blocks, a dense head that starts at zero, so a fresh network is
    ``mu = 0`` and ``NoisyInputShift(model, net)`` starts as ``model``).
    ``gamma`` bounds every coordinate of the shift. Nothing about it needs to be
    bounded for soundness: it is part of the base classifier.
    """

    kind = "noisy_shift"
    #: mu is computed from the noisy sample ``z`` (part of the base classifier)
    clean_input = False

    def __init__(self, input_shape, gamma: float = 1.0, channels=(16, 32, 32, 32), pool: int = 4,
                 head_size: int | None = None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.gamma = float(gamma)
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be finite and > 0, got {gamma}")
        self.channels = tuple(int(c) for c in channels)
        self.pool = int(pool)
        self.head_size = None if head_size is None else int(head_size)
        self.net = ConvGenerator(self.input_shape, self.channels, self.pool, self.head_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.tanh(self.net(z))

    def describe(self) -> dict:
        return {"kind": self.kind, "input_shape": list(self.input_shape), "gamma": self.gamma,
                "channels": list(self.channels), "pool": self.pool, "head_size": self.head_size}
