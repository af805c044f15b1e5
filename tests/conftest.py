"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory):
    """A tiny MNIST CNN run of `ucan train` (256 images, 1 epoch, Gaussian 0.25), trained once per session;
    tests only read it. Skips when the MNIST data wheel is not installed."""
    from ucan_smoothing.training import train_classifier

    try:
        return train_classifier(max_train=256, max_test=64, epochs=1, out=str(tmp_path_factory.mktemp("run") / "r"),
                                progress=False, seed=0)
    except FileNotFoundError as error:
        pytest.skip(str(error))
