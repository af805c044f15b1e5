"""Training: noise-augmented base classifiers and noise parameter generators.

* :mod:`.config`: every option, its defaults and checks (``TrainConfig``);
* :mod:`.batches`, :mod:`.noise`: the data and the noise of a training step;
* :mod:`.checkpoints`: metrics, random states and checkpoint metadata (resume);
* :mod:`.loop`: the run itself, :func:`train`.

A finished run is opened with :func:`ucan_smoothing.runs.load_trained`.
"""

from .checkpoints import read_metrics
from .config import TrainConfig, resolve_config
from .loop import train, train_classifier, train_generator

__all__ = ["TrainConfig", "read_metrics", "resolve_config", "train", "train_classifier", "train_generator"]
