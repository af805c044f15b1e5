"""The noise of a training step: how it is applied, and the generator it is drawn from."""

from __future__ import annotations

import torch
from torch import nn

from ..core.anisotropic import Anisotropic
from ..core.noises import Noise
from ..npg.generators import NoiseGenerator


class NoiseSource:
    """``x -> x + noise`` for training and evaluation: isotropic, fixed anisotropic, or an NPG."""

    def __init__(self, base: Noise, generator: NoiseGenerator | None = None, fixed: Anisotropic | None = None):
        self.base, self.generator, self.fixed = base, generator, fixed

    def params(self, x: torch.Tensor, module: nn.Module | None = None):
        """(sigma, mu) of the NPG for batch ``x`` (``module``: its DDP wrapper, if any)."""
        gen = module if module is not None else self.generator
        return gen(x) if self.generator.input_dependent else gen()

    def perturb(self, x: torch.Tensor, rng: torch.Generator, sigma=None, mu=None) -> torch.Tensor:
        shape = tuple(x.shape)
        if self.generator is not None:
            eps = self.base.sample(shape, generator=rng, device=x.device, dtype=x.dtype)
            return x + eps * sigma + mu
        source = self.fixed if self.fixed is not None else self.base
        return x + source.sample(shape, generator=rng, device=x.device, dtype=x.dtype)


def step_generator(device: torch.device, *seeds: int) -> torch.Generator:
    rng = torch.Generator(device=device)
    # A fixed mixing of (seed, epoch, rank, purpose) into one 63-bit seed.
    value = 0x9E3779B97F4A7C15
    for s in seeds:
        value = (value * 6364136223846793005 + int(s) + 1442695040888963407) % (2**63)
    rng.manual_seed(value)
    return rng
