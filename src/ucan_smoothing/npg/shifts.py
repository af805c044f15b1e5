"""The trainable shift kinds of ``ucan train npg --kind ...`` (the sound input-adaptive modes):
build, rebuild from a checkpoint, and turn into the smoothed classifier to certify."""

from __future__ import annotations

from torch import nn

from ..core.smooth import Smooth
from .generators import build_by_kind, load_saved_weights
from .lipschitz_shift import LipschitzShiftNet, LipschitzShiftSmooth
from .noisy_shift import NoisyInputShift, NoisyShiftNet

#: the trainable shift kinds of ``ucan train npg --kind ...`` (sound input-adaptive modes)
SHIFTS = {cls.kind: cls for cls in (NoisyShiftNet, LipschitzShiftNet)}


def make_shift(kind: str, input_shape, **params) -> nn.Module:
    """Build a fresh shift network by kind: ``make_shift('lipschitz_shift', (1, 28, 28), lipschitz=0.5)``."""
    return build_by_kind(SHIFTS, "shift", kind, input_shape, **params)


def shift_from_config(config: dict, state_dict: dict | None = None) -> nn.Module:
    """Rebuild a shift network from its ``describe()`` (and ``state_dict()``)."""
    if not isinstance(config, dict) or "kind" not in config or "input_shape" not in config:
        raise ValueError(f"a shift config is a dict with 'kind' and 'input_shape', got {config!r}")
    params = {k: v for k, v in config.items() if k not in ("kind", "input_shape")}
    shift = make_shift(config["kind"], config["input_shape"], **params)
    return load_saved_weights(shift, state_dict, config["kind"], "shift").eval()


def shift_smoothed(model: nn.Module, num_classes: int, noise, shift: nn.Module, *, input_shape=None):
    """The smoothed classifier of a trained shift under FIXED ``noise``, ready to certify (both sound):

    * ``noisy_shift``: ``Smooth(NoisyInputShift(model, shift), num_classes, noise)``;
    * ``lipschitz_shift``: ``LipschitzShiftSmooth(model, num_classes, noise, shift)``, radius ``R / (1 + L)``
      with ``L`` recomputed from the weights (:func:`lipschitz_bounds`).
    """
    kind = getattr(shift, "kind", None)
    if kind == NoisyShiftNet.kind:
        return Smooth(NoisyInputShift(model, shift).eval(), num_classes, noise, input_shape=input_shape)
    if kind == LipschitzShiftNet.kind:
        return LipschitzShiftSmooth(model, num_classes, noise, shift, input_shape=input_shape)
    raise ValueError(f"not a trained shift network: {type(shift).__name__} (kinds: {', '.join(SHIFTS)})")
