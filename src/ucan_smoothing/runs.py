"""The one way to open something to certify: a run folder or checkpoint of ``ucan train``.

:func:`load_trained` turns a checkpoint back into objects (:class:`TrainedRun`),
and :meth:`TrainedRun.smoothed` builds the smoothed classifier it is certified
as. ``ucan certify``, ``ucan attack`` and the analysis depend on this module,
not on the training code.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .core.noises import Noise, make_noise
from .core.smooth import Smooth
from .data import canonical_dataset_name
from .models import Autocast, load_checkpoint, model_spec, to_channels_last
from .npg.generators import NoiseGenerator, generator_from_config
from .npg.lipschitz_shift import lipschitz_bounds
from .npg.paper_mode import PaperModeSmooth
from .npg.shifts import shift_from_config, shift_smoothed

#: the checkpoints of a run folder: rewritten after every epoch / written at the end
LAST, FINAL = "last.pt", "final.pt"


@dataclass
class TrainedRun:
    """A checkpoint of :mod:`ucan_smoothing.training` turned back into objects.

    ``noise()`` is the FIXED noise: the isotropic family, or the fixed
    ``Anisotropic`` noise of a pattern-fixed / universal NPG; it raises for an
    input-dependent NPG (its certificate would not be sound).
    ``shift`` is the trained ``mu`` network of a sound input-adaptive run
    (``noisy_shift`` / ``lipschitz_shift``), else None.

    :meth:`smoothed` is what certification and attacks need: the smoothed
    classifier the run is certified as (``certify``, ``certify_batch``,
    ``predict``; ``noisy_logits`` except for a plain ``Smooth``), and
    :meth:`description` its text for the ``npg`` column of result files.
    """

    model: nn.Module
    base_noise: Noise
    generator: NoiseGenerator | None
    meta: dict
    shift: nn.Module | None = None

    def noise(self, sigma_min: float = 1e-6):
        if self.generator is None:
            return self.base_noise
        return self.generator.to_noise(self.base_noise, sigma_min=sigma_min)

    @property
    def input_dependent(self) -> bool:
        """True for the paper's input-dependent NPG (certified only in the labelled paper mode)."""
        return self.generator is not None and self.generator.input_dependent

    def smoothed(self, device=None, *, paper_mode: bool = False, sigma_min: float = 1e-6,
                 channels_last: bool = False, amp: str | None = None):
        """The smoothed classifier to certify, on ``device`` (default: where the model is),
        with the classifier's weights stored channels-last if asked (faster convolutions,
        see :func:`~ucan_smoothing.models.to_channels_last`) and run in mixed precision
        with ``amp`` ("bf16" or "fp16", :class:`~ucan_smoothing.models.Autocast`):

        * plain or fixed-NPG runs: ``Smooth(model, num_classes, noise())``;
        * ``noisy_shift``: ``Smooth(NoisyInputShift(model, mu), ...)`` under the fixed noise;
        * ``lipschitz_shift``: ``LipschitzShiftSmooth`` (radius ``R / (1 + L)``);
        * input-dependent NPG: only with ``paper_mode=True``, a ``PaperModeSmooth``
          (NOT a certificate; every certificate it returns says so).
        """
        if paper_mode and not self.input_dependent:
            raise ValueError("--paper-mode is only for runs with an input-dependent generator")
        if self.input_dependent and not paper_mode:
            raise ValueError("this run's generator computes sigma and mu from the input being certified: its "
                             "certificate is not sound (DESIGN.md section 4). Pass --paper-mode to reproduce the "
                             "paper's figures, labelled is_certificate=false, or use a sound mode of "
                             "ucan_smoothing.npg")
        model = self.model if device is None else self.model.to(device)
        if channels_last:
            model = to_channels_last(model)
        if amp is not None:
            model = Autocast(model, amp)
        if paper_mode:
            generator = self.generator if device is None else self.generator.to(device)
            return PaperModeSmooth(model, self.num_classes, self.base_noise, generator,
                                   input_shape=self.input_shape)
        noise = self.noise(sigma_min)
        if self.shift is not None:
            shift = self.shift if device is None else self.shift.to(device)
            return shift_smoothed(model, self.num_classes, noise, shift, input_shape=self.input_shape)
        return Smooth(model, self.num_classes, noise, input_shape=self.input_shape)

    def lipschitz(self) -> float | None:
        """``lipschitz_shift`` runs: the proven ``L`` of the noise's primary norm (sigma folded in); else None."""
        if self.shift is None or not getattr(self.shift, "clean_input", False):
            return None
        noise = self.noise()
        return lipschitz_bounds(self.shift, noise)[noise.primary_norm]

    def description(self) -> str:
        """Text for the ``npg`` column: ``none``, ``pattern:p=2``, ``universal``, ``input_dependent``,
        ``noisy_shift``, ``lipschitz_shift:L=0.5``; a shift under a fixed NPG's noise adds it after a ``+``
        (``noisy_shift+pattern:p=1``)."""
        text = "none"
        if self.generator is not None:
            info = self.generator.describe()
            text = f"{info['kind']}:p={info['p']}" if "p" in info else info["kind"]
        if self.shift is None:
            return text
        lipschitz = self.lipschitz()
        shift = self.shift.kind if lipschitz is None else f"{self.shift.kind}:L={lipschitz:.4g}"
        return shift if self.generator is None else f"{shift}+{text}"

    @property
    def num_classes(self) -> int:
        return model_spec(self.meta["model_name"]).num_classes

    @property
    def input_shape(self) -> tuple:
        return model_spec(self.meta["model_name"]).input_shape


def _check_noise_matches(path, saved: dict, expected) -> None:
    if expected is None:
        return
    want = expected.describe() if isinstance(expected, Noise) else dict(expected)
    for key in ("family", "scale"):
        if key in want and saved.get(key) is not None:
            same = (math.isclose(float(saved[key]), float(want[key]), rel_tol=1e-9) if key == "scale"
                    else saved[key] == want[key])
            if not same:
                raise ValueError(f"checkpoint {os.fspath(path)!r} was trained with {saved.get('family')} noise of "
                                 f"scale {saved.get('scale')} but {want.get('family', saved.get('family'))} noise "
                                 f"of scale {want.get('scale', saved.get('scale'))} was expected")


def run_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path``: itself, or a run folder's ``final.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in (FINAL, LAST):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"run folder {str(path)!r} holds neither {FINAL} nor {LAST}")
    return path


def load_trained(path: str | os.PathLike, expected_model: str | None = None, expected_dataset: str | None = None,
                 expected_noise=None) -> TrainedRun:
    """Load a checkpoint written by training (``final.pt`` / ``last.pt``), or a run folder.

    ``expected_*`` (model name, data set, noise: a ``Noise`` or ``{"family",
    "scale"}``) are checked; a mismatch raises ``ValueError`` naming both.
    """
    path = run_checkpoint(path)
    if expected_dataset is not None:
        expected_dataset = canonical_dataset_name(expected_dataset)
    model, meta = load_checkpoint(path, expected_model_name=expected_model, expected_dataset=expected_dataset)
    extra = meta["extra"]
    inside = extra.get("ucan_train", {}).get("inside_epoch")
    if inside is not None:
        warnings.warn(f"{str(path)!r} was saved inside epoch {inside['epoch']} (after step {inside['step']}) of an "
                      "unfinished run: its weights are not those of a finished epoch")
    saved_noise = extra.get("noise")
    if not saved_noise:
        raise ValueError(f"checkpoint {str(path)!r} does not record its training noise (not written by `ucan train`)")
    _check_noise_matches(path, saved_noise, expected_noise)
    params = {k: v for k, v in saved_noise.items() if k not in ("family", "scale")}
    base = make_noise(saved_noise["family"], saved_noise["scale"], **params)
    generator = None
    if extra.get("npg") is not None:
        generator = generator_from_config(extra["npg"], extra.get("npg_state"))
        generator.eval()
    shift = None
    if extra.get("shift") is not None:
        shift = shift_from_config(extra["shift"], extra.get("shift_state"))
    return TrainedRun(model, base, generator, meta, shift)
