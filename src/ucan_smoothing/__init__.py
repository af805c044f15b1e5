"""ucan_smoothing: certified robustness by randomized smoothing with anisotropic noise.

Every radius the package reports is a proven certificate, except the ALM
figure (a volume-equivalent radius) and anything whose ``is_certificate`` is
False. See README.md and ../shared/DESIGN.md for the mathematics.
"""

from .anisotropic import Anisotropic
from .noises import FAMILIES, ExpInf, Gaussian, Laplace, Noise, PowerLaw, Uniform, make_noise
from .norms import parse_norm
from .regions import CertifiedRegion, Scaling
from .smooth import ABSTAIN, Certificate, Smooth
from .statistics import clopper_pearson_lower, clopper_pearson_upper, min_samples_to_certify

__version__ = "0.1.0"

__all__ = [
    "ABSTAIN",
    "Anisotropic",
    "Certificate",
    "CertifiedRegion",
    "ExpInf",
    "FAMILIES",
    "Gaussian",
    "Laplace",
    "Noise",
    "PowerLaw",
    "Scaling",
    "Smooth",
    "Uniform",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "make_noise",
    "min_samples_to_certify",
    "parse_norm",
]
