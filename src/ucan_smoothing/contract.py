"""The input contract, checked in seconds before hours of certification.

Every model certified here takes images in ``[0, 1]``, the noise scale is in
those pixel units, and any normalisation happens inside the model. The usual
ways to break it (a model that expects ``[-1, 1]`` or already-normalised
inputs, a normalisation applied twice, a noise level given in the wrong
units) leave a clear trace on a handful of images: the clean accuracy falls to
chance, or the clean accuracy is fine while one noisy draw per image is
classified at chance. :func:`check_input_contract` measures both;
:meth:`ContractReport.problem` says what looks wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .core.smooth import Smooth
from .core.streams import resolve_generator

#: images measured by default: enough to tell a working model from chance, in seconds
DEFAULT_IMAGES = 32


@dataclass(frozen=True)
class ContractReport:
    """Clean and noisy (one draw per image) accuracy of the base classifier on ``images`` images."""

    images: int
    clean_accuracy: float
    noisy_accuracy: float
    chance: float

    def near_chance(self, accuracy: float) -> bool:
        # Twice chance: a model that honours the contract is far above it; a broken one sits at it.
        return accuracy <= 2 * self.chance

    def problem(self) -> str | None:
        """Why the contract looks broken, or None."""
        if self.near_chance(self.clean_accuracy):
            return (f"the model classifies clean inputs at chance ({self.clean_accuracy:.0%} on {self.images} "
                    f"images, chance {self.chance:.0%}): it may expect another input range or normalisation than "
                    "images in [0, 1] with its normalisation inside")
        if self.near_chance(self.noisy_accuracy):
            return (f"clean accuracy {self.clean_accuracy:.0%} but noisy accuracy {self.noisy_accuracy:.0%} "
                    f"(chance {self.chance:.0%}) on {self.images} images: the noise scale may be in other units "
                    "than [0, 1] pixels, or the model was not trained under this noise")
        return None

    def line(self) -> str:
        return (f"input contract: clean accuracy {self.clean_accuracy:.1%}, noisy accuracy {self.noisy_accuracy:.1%} "
                f"(one draw per image) on {self.images} images; chance {self.chance:.1%}")

    def to_dict(self) -> dict:
        return asdict(self)


def _noisy_predictions(smoothed, xs: torch.Tensor, generator) -> torch.Tensor:
    if hasattr(smoothed, "noisy_logits"):  # input-adaptive modes draw their own noise
        return torch.stack([smoothed.noisy_logits(x, 1, generator)[0].argmax() for x in xs])
    noise = smoothed.noise.sample(tuple(xs.shape), generator=generator, device=xs.device, dtype=xs.dtype)
    return smoothed.model(xs + noise).argmax(dim=1)


def check_input_contract(smoothed, base_model, images, labels, num_classes: int, seed: int = 0) -> ContractReport:
    """Measure the base classifier on ``images`` (a batch in [0, 1]) clean and under one noise draw each.

    ``smoothed`` is what will be certified (a :class:`~ucan_smoothing.Smooth` or an
    input-adaptive mode with ``noisy_logits``), ``base_model`` its classifier. The noise
    comes from its own stream (``seed``), not from any image's certification stream.
    """
    device = next((p.device for p in base_model.parameters()), images.device)
    xs = images.to(device, torch.float32)
    labels = torch.as_tensor(labels, device=device)
    generator = resolve_generator(seed, device)
    classifier = smoothed.model if isinstance(smoothed, Smooth) else base_model  # Smooth may cast its input
    with torch.inference_mode():
        clean = classifier(xs).argmax(dim=1)
        noisy = _noisy_predictions(smoothed, xs, generator)
    return ContractReport(
        images=len(xs),
        clean_accuracy=float((clean == labels).float().mean()),
        noisy_accuracy=float((noisy == labels).float().mean()),
        chance=1.0 / num_classes,
    )
