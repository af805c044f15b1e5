"""Noise streams: where the randomness of every Monte Carlo estimate comes from."""

from __future__ import annotations

import torch


def resolve_generator(generator, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` from a generator (checked), an int seed or None (fresh entropy)."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != device.type:
            raise ValueError(
                f"the generator lives on {generator.device} but noise is drawn on {device}; "
                f"pass a seed or torch.Generator(device='{device}')"
            )
        return generator
    made = torch.Generator(device=device)
    if generator is None:
        made.seed()
    elif isinstance(generator, int) and not isinstance(generator, bool):
        made.manual_seed(generator)
    else:
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
    return made


def image_generator(seed: int, idx: int, device: torch.device) -> torch.Generator:
    """The noise stream of image ``idx``: independent of which process or run certifies it.

    The seed is folded into 32 bits because PyTorch's CPU generator keeps only
    the low 32 bits of a seed. ``seed`` picks an odd-multiplier offset (a
    bijection of the 32-bit values, so each seed gives each image its own
    stream); seed 0 gives image ``idx`` the seed ``idx``.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((idx ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF)
    return generator


def model_device(module, fallback: torch.device) -> torch.device:
    """The device of ``module``'s first parameter (``fallback`` for a function or a module without any)."""
    parameter = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return parameter.device if parameter is not None else fallback
