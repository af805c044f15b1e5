"""Noise parameter generators (NPGs) and the input-adaptive modes, each with its guarantee.

Fixed noise shapes (sound: Theorem 3.2 with ``sigma, mu`` fixed):

* :mod:`.generators`: pattern-fixed and universal NPGs, and the paper's
  input-dependent NPG (whose per-input certificate is NOT sound).

Input-adaptive modes, one module each (DESIGN.md section 4; proofs in docs/adaptive.md):

* :mod:`.paper_mode`: the paper's procedure, ``sigma(x), mu(x)`` frozen at the
  clean input. NOT a certificate: every result says ``is_certificate=False``.
* :mod:`.noisy_shift`: ``f(z + mu(z))`` on the noisy sample ``z``; sound (it is
  another base classifier under fixed noise).
* :mod:`.lipschitz_shift`: ``mu(x)`` from the clean input with a proven
  Lipschitz bound ``L``; sound with radius ``R / (1 + L)``.
* :mod:`.elastic_sigma`: a semi-elastic Gaussian level ``sigma(x)`` (Sukenik et
  al., ICML 2022); sound with a chained Neyman-Pearson radius.
* :mod:`.shifts`: the registry of trainable shift networks (``ucan train npg
  --kind noisy_shift | lipschitz_shift``).
* :mod:`.counterexamples`: the two exact 1-D cases where the paper mode fails.

Every smoothed classifier here has ``certify``, ``certify_batch``, ``predict``
and ``noisy_logits(x, num, generator)`` (differentiable logits of ``num`` noisy
copies of ``x`` under the classifier's own noise at ``x``), which is what
:mod:`ucan_smoothing.attack` needs.
"""

from .counterexamples import Counterexample, Interval1D, Threshold1D, scale_counterexample, shift_counterexample
from .elastic_sigma import ElasticSigmaSmooth, elastic_sigma_lower_bound, elastic_sigma_radius
from .generators import (
    GENERATORS,
    InputDependentGenerator,
    NoiseGenerator,
    PatternFixedGenerator,
    UniversalGenerator,
    generator_from_config,
    make_generator,
)
from .lipschitz_shift import LipschitzMLP, LipschitzShiftNet, LipschitzShiftSmooth, lipschitz_bounds
from .noisy_shift import NoisyInputShift, NoisyShiftNet
from .paper_mode import NOT_A_CERTIFICATE, PaperModeSmooth
from .shifts import SHIFTS, make_shift, shift_from_config, shift_smoothed

__all__ = [
    "GENERATORS", "NOT_A_CERTIFICATE", "SHIFTS", "Counterexample", "Interval1D", "Threshold1D", "ElasticSigmaSmooth", "InputDependentGenerator",
    "LipschitzMLP", "LipschitzShiftNet", "LipschitzShiftSmooth", "NoiseGenerator", "NoisyInputShift",
    "NoisyShiftNet", "PaperModeSmooth", "PatternFixedGenerator", "UniversalGenerator", "elastic_sigma_lower_bound",
    "elastic_sigma_radius", "generator_from_config", "lipschitz_bounds", "make_generator", "make_shift",
    "scale_counterexample", "shift_counterexample", "shift_from_config", "shift_smoothed",
]
