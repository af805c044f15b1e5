"""Dual randomized smoothing (npg/dual.py): a smoothed selector choosing among fixed-noise experts.

The oracle: 1-D inputs, a selector that picks expert 1 above 0 and expert 0 below, expert 0 the
threshold at 0 and expert 1 the threshold at -0.5, all under Gaussian noise 1. The dual classifier
``G(x') = g_{k(x')}(x')`` is class 1 exactly on ``x' > 0``: from ``x = 1`` its exact flip distance is
1, while expert 1 alone would certify about 1.5. A certificate beyond 1 is an over-claim.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from scipy import stats
from torch import nn

from ucan_smoothing import Gaussian, Smooth
from ucan_smoothing.core.certificate import ABSTAIN
from ucan_smoothing.npg.counterexamples import Threshold1D
from ucan_smoothing.npg.dual import DualSmooth


class ShiftedThreshold(nn.Module):
    """``[x > at]`` on 1-D inputs: logits ``(-(x - at), x - at)``."""

    def __init__(self, at: float):
        super().__init__()
        self.at = at

    def forward(self, x):
        return torch.cat([-(x - self.at), x - self.at], dim=1)


def oracle(share=0.5) -> DualSmooth:
    selector = Smooth(Threshold1D(), 2, Gaussian(1.0), input_shape=(1,))
    experts = [Smooth(Threshold1D(), 2, Gaussian(1.0), input_shape=(1,)),
               Smooth(ShiftedThreshold(-0.5), 2, Gaussian(1.0), input_shape=(1,))]
    return DualSmooth(selector, experts, share)


EXACT_FLIP = 1.0  # from x = 1 the dual classifier changes class at x' = 0


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_dual_certificates_overclaim_at_most_alpha_on_the_oracle(alpha):
    dual, x, trials = oracle(), torch.ones(1), 300
    over = expert_alone_over = 0
    for seed in range(trials):
        certificate = dual.certify(x, 20, 200, alpha, batch_size=220, generator=seed)
        assert certificate.is_certificate and certificate.prediction == 1
        assert certificate.radius(2) <= certificate.extra["selector_radius_l2"] + 1e-12
        over += certificate.radius(2) > EXACT_FLIP
        expert_alone_over += certificate.extra["expert_radii"]["l2"] > EXACT_FLIP
    # one-sided binomial tolerance of the rate alpha (the selector's share of it is enough, not needed)
    assert stats.binom.sf(over - 1, trials, alpha) > 1e-3, f"{over} over-claims in {trials} at alpha={alpha}"
    # the oracle can tell: the expert's own certificate, without the selector's cap, over-claims mostly
    assert expert_alone_over > trials / 2


def test_the_dual_certificate_approaches_the_exact_flip_distance():
    certificate = oracle().certify(torch.ones(1), 100, 100_000, 0.001, batch_size=50_000, generator=0)
    assert EXACT_FLIP - 0.08 < certificate.radius(2) <= EXACT_FLIP
    assert certificate.extra["expert"] == 1
    # the other norms are the l2 ball's inscribed balls, within the expert's own regions
    assert certificate.radius(1) == pytest.approx(certificate.radius(2))
    assert certificate.radius(math.inf) == pytest.approx(certificate.radius(2))  # d = 1


def test_the_dual_classifier_abstains_where_the_selector_cannot_decide():
    dual = oracle()
    certificate = dual.certify(torch.zeros(1), 100, 1000, 0.001, generator=0)  # selector p = 1/2 exactly
    assert certificate.abstained and certificate.extra["expert"] == ABSTAIN and certificate.radius(2) == 0
    assert dual.predict(torch.zeros(1), 1000, 0.001, generator=0) == ABSTAIN
    assert dual.predict(torch.full((1,), 2.0), 1000, 0.001, generator=0) == 1
    assert dual.predict(torch.full((1,), -2.0), 1000, 0.001, generator=0) == 0


def test_the_selector_share_splits_alpha():
    certificate = oracle(share=0.25).certify(torch.ones(1), 100, 1000, 0.01, generator=0)
    assert certificate.alpha == 0.01
    # the selector's bound at 0.25 * alpha: lower than with half of alpha on the same samples
    half = oracle(share=0.5).certify(torch.ones(1), 100, 1000, 0.01, generator=0)
    assert certificate.extra["selector_p_lower"] < half.extra["selector_p_lower"]


def test_bad_dual_set_ups_are_refused():
    selector = Smooth(Threshold1D(), 2, Gaussian(1.0), input_shape=(1,))
    expert = Smooth(Threshold1D(), 2, Gaussian(1.0), input_shape=(1,))
    with pytest.raises(ValueError, match="chooses among 2 experts but 3"):
        DualSmooth(selector, [expert] * 3)
    with pytest.raises(ValueError, match="share"):
        DualSmooth(selector, [expert] * 2, share=1.0)
    from ucan_smoothing.core.noises import Laplace
    with pytest.raises(ValueError, match="Gaussian"):
        DualSmooth(Smooth(Threshold1D(), 2, Laplace(1.0), input_shape=(1,)), [expert] * 2)


def ucan(*args):
    return subprocess.run([sys.executable, "-m", "ucan_smoothing.cli", *map(str, args)], capture_output=True,
                          text=True)


def test_train_dual_certify_and_attack_from_the_cli(tmp_path, mnist_run):
    from ucan_smoothing.training import train_classifier

    wide = train_classifier(max_train=256, max_test=64, epochs=1, out=str(tmp_path / "wide"), progress=False,
                            seed=1, scale=1.0)
    dual = tmp_path / "dual"
    done = ucan("train-dual", mnist_run, wide, "--out", dual, "--max-train", 128, "--epochs", 1,
                "--label-samples", 4, "--no-progress")
    assert done.returncode == 0, done.stderr
    record = json.loads((dual / "dual.json").read_text())
    assert sum(record["target_counts"]) == 128 and record["selector_noise"] == {"family": "gaussian", "scale": 0.5}
    out = tmp_path / "dual.tsv"
    done = ucan("certify", dual, "--out", out, "--n0", 20, "--n", 200, "--max", 2, "--skip", 50,
                "--no-contract-check", "--no-progress")
    assert done.returncode == 0, done.stderr
    from ucan_smoothing.results import read_results
    rows = read_results(out)
    assert len(rows) == 2
    for row in rows:
        assert row["is_certificate"] and row["npg"].startswith("dual:gaussian:0.25|gaussian:1;")
        assert row["expert"] in (-1, 0, 1)
        assert row["radius_l2"] <= row["selector_radius_l2"] + 1e-12
    done = ucan("attack", out, "--out", tmp_path / "attack.tsv", "--n", 200, "--steps", 2, "--samples", 8,
                "--no-progress")
    assert done.returncode == 0, done.stderr
    # the sequential modes are not proven for it: one line, exit 2, nothing written
    done = ucan("certify", dual, "--out", tmp_path / "seq.tsv", "--radius", 0.5)
    assert done.returncode == 2 and "not available for a dual run" in done.stderr
    assert not (tmp_path / "seq.tsv").exists()
    # an expert changed after training: refused, naming it
    with open(wide / "final.pt", "ab") as handle:
        handle.write(b"\0")
    done = ucan("certify", dual, "--out", tmp_path / "changed.tsv", "--n", 200)
    assert done.returncode == 2 and "changed since the selector was trained" in done.stderr
