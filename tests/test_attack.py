"""`ucan attack` and ucan_smoothing.attack: the attack finds the flips of the paper mode on the
DESIGN.md section 4 counterexamples (exact search and PGD), finds nothing on proven certificates,
and the command reads a result file with its sidecar, writes a resumable attack file and a
per-file violation summary; `ucan certify --paper-mode` labels its rows."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ucan_smoothing import Anisotropic, Gaussian, Smooth
from ucan_smoothing.npg import (
    ElasticSigmaSmooth,
    LipschitzShiftSmooth,
    NoisyInputShift,
    scale_counterexample,
    shift_counterexample,
)
from ucan_smoothing.attack import ATTACK_SCHEMA, attack_certificate, exact_search, pgd_attack, project, summarize
from ucan_smoothing.cli import main
from ucan_smoothing.results import read_results, read_sidecar
from ucan_smoothing.training import train_classifier, train_generator

from oracles import LinearBinary

ALPHA = 0.001


def certify_and_attack(smoothed, x, exact_probabilities=None, n=100_000, seed=0):
    cert = smoothed.certify(x, 100, n, ALPHA, batch_size=100_000, generator=seed)
    result = attack_certificate(smoothed, x, cert.prediction, cert.radius(2), 2, n=10_000, alpha=ALPHA,
                                exact_probabilities=exact_probabilities, generator=seed + 1)
    return cert, result


# --------------------------------------------------------------------------- the counterexamples


@pytest.mark.parametrize("make, claimed, flip", [(shift_counterexample, 3.81, 0.0598),
                                                 (scale_counterexample, 0.762, 0.5)], ids=["mu", "sigma"])
def test_the_attack_breaks_the_paper_mode_on_the_counterexamples(make, claimed, flip):
    ce = make()
    paper = ce.paper_mode()
    cert, exact = certify_and_attack(paper, ce.x, ce.exact_probabilities)
    assert not cert.is_certificate and cert.radius(2) == pytest.approx(claimed, abs=2e-3)
    assert exact.method == "exact" and exact.exact_flip == pytest.approx(flip, abs=1e-4)
    assert exact.violation and exact.attacked_predict != cert.prediction and exact.p_upper < 0.5
    assert exact.delta_norm <= cert.radius(2)
    # PGD on the soft smoothed classifier finds a violation too, without the oracle
    pgd = attack_certificate(paper, ce.x, cert.prediction, cert.radius(2), 2, n=10_000, alpha=ALPHA, generator=5)
    assert pgd.method == "pgd" and pgd.violation and pgd.delta_norm <= cert.radius(2)


def test_paper_mode_violation_rate_over_many_inputs_and_none_for_the_sound_modes():
    """The mu counterexample at 8 inputs: paper mode is broken at every one, the Lipschitz mode
    (same smoothed classifier, radius / (1 + L)) at none."""
    ce = shift_counterexample()
    paper = ce.paper_mode()
    sound = LipschitzShiftSmooth(ce.model, 2, Gaussian(1.0), ce.npg.mu, ce.lipschitz)
    paper_hits, sound_hits = [], []
    for i, x0 in enumerate(np.linspace(0.0, 1.5, 8)):
        x = torch.tensor([x0], dtype=torch.float32)
        for smoothed, hits in ((paper, paper_hits), (sound, sound_hits)):
            cert = smoothed.certify(x, 100, 20_000, ALPHA, batch_size=20_000, generator=i)
            result = attack_certificate(smoothed, x, cert.prediction, cert.radius(2), 2, n=5_000, alpha=ALPHA,
                                        exact_probabilities=ce.exact_probabilities, exact_points=201,
                                        generator=100 + i)
            hits.append(result.violation)
    assert not summarize(paper_hits, ALPHA, ALPHA)["consistent_with_certificates"]
    assert sum(paper_hits) == 8
    assert sum(sound_hits) == 0 and summarize(sound_hits, ALPHA, ALPHA)["consistent_with_certificates"]


def test_the_sound_modes_survive_the_attack_on_the_counterexamples():
    ce = shift_counterexample()
    z_star = -ce.flip_distance  # f(z + mu(z)) = [z > z*]
    shifted = Smooth(NoisyInputShift(ce.model, ce.npg.mu), 2, Gaussian(1.0))
    cert, result = certify_and_attack(shifted, ce.x,
                                      lambda p: [stats.norm.sf(float(p[0]) - z_star),
                                                 stats.norm.cdf(float(p[0]) - z_star)])
    assert cert.is_certificate and result.attacked and not result.violation and math.isnan(result.exact_flip)
    lipschitz = LipschitzShiftSmooth(ce.model, 2, Gaussian(1.0), ce.npg.mu, ce.lipschitz)
    cert, result = certify_and_attack(lipschitz, ce.x, ce.exact_probabilities)
    assert cert.is_certificate and result.attacked and not result.violation
    sc = scale_counterexample()
    elastic = ElasticSigmaSmooth(sc.model, 3, 1.0, sc.npg.sigma, sc.lipschitz)
    cert, result = certify_and_attack(elastic, sc.x, sc.exact_probabilities)
    assert cert.is_certificate and result.attacked and not result.violation
    pgd = attack_certificate(elastic, sc.x, cert.prediction, cert.radius(2), 2, n=10_000, alpha=ALPHA, generator=3)
    assert pgd.method == "pgd" and not pgd.violation


# --------------------------------------------------------------------------- proven certificates


W = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25, 1.5])
SIGMA = torch.tensor([0.5, 2.0, 1.0, 0.3, 0.8, 1.7, 1.2, 0.6])


@pytest.mark.parametrize("norm", [2, math.inf])
def test_no_violations_on_proven_certificates_of_a_linear_oracle(norm):
    model = LinearBinary(W, 0.2)
    smooth = Smooth(model, 2, Anisotropic(Gaussian(0.5), SIGMA), input_shape=(8,))

    def exact(point):
        p_one = stats.norm.cdf(model.margin(point) / (0.5 * float(torch.linalg.vector_norm(SIGMA * W))))
        return [1 - p_one, p_one]

    xs = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    violations = []
    for i, cert in enumerate(smooth.certify_batch(xs, 100, 20_000, ALPHA, batch_size=100_000, generator=1)):
        for oracle in (exact, None):
            result = attack_certificate(smooth, xs[i], cert.prediction, cert.radius(norm), norm, n=5_000,
                                        alpha=ALPHA, exact_probabilities=oracle, exact_points=101, generator=i)
            violations.append(result.violation)
            if oracle is not None and result.attacked:
                assert math.isnan(result.exact_flip), "the exact search crossed a proven boundary"
    assert sum(violations) == 0


def test_summary_counts_against_the_rate_alpha_allows():
    fine = summarize([False] * 999 + [True], 0.001, 0.001)
    assert fine["violation_rate"] == 0.001 and fine["consistent_with_certificates"]
    broken = summarize([True] * 10 + [False] * 90, 0.001, 0.001)
    assert broken["p_value"] < 1e-10 and not broken["consistent_with_certificates"]
    assert summarize([], 0.001, 0.001)["attacked"] == 0


def test_abstentions_and_zero_radii_are_not_attacked():
    smooth = Smooth(LinearBinary(W, 0.2), 2, Gaussian(0.5))
    assert not attack_certificate(smooth, torch.zeros(8), -1, 0.0, 2).attacked
    assert not attack_certificate(smooth, torch.zeros(8), 1, 0.0, 2).attacked


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("norm", [1, 2, math.inf])
def test_projection_lands_in_the_ball_and_is_the_closest_point(norm):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = 3 * torch.randn(6, generator=generator, dtype=torch.float64)
        radius = 1.3
        p = project(v, radius, norm)
        assert float(torch.linalg.vector_norm(p, ord=norm)) <= radius * (1 + 1e-12)
        assert torch.allclose(project(p, radius, norm), p)
        # no point of the ball (random ones, scaled to the sphere) is closer to v
        others = torch.randn(2000, 6, generator=generator, dtype=torch.float64)
        others = others / torch.linalg.vector_norm(others, ord=norm, dim=1, keepdim=True) * radius
        others = others * torch.rand(2000, 1, generator=generator, dtype=torch.float64)
        assert float((v - p).norm()) <= float((v - others).norm(dim=1).min()) + 1e-12
    inside = torch.full((6,), 0.1, dtype=torch.float64)
    assert torch.equal(project(inside, 1.3, norm), inside)


def test_pgd_and_exact_search_stay_inside_the_ball():
    ce = shift_counterexample()
    for norm in (1, 2, math.inf):
        delta = pgd_attack(ce.paper_mode(), ce.x, 1, 0.5, norm, steps=5, samples=4, generator=0)
        assert float(delta.abs().max()) <= 0.5
    delta, flip = exact_search(ce.exact_probabilities, ce.x, 1, 0.05, 2)
    assert delta is None and flip is None  # the flip is at 0.0598, outside this ball


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    options = dict(max_train=256, max_test=32, epochs=1, progress=False, seed=0, threads=2)
    try:
        base = train_classifier(out=str(root / "base"), **options)
    except FileNotFoundError as error:  # MNIST wheel not installed
        pytest.skip(str(error))
    npg = train_generator(npg={"kind": "input_dependent", "channels": [4, 4, 4, 4]}, base=str(base),
                          out=str(root / "npg"), **{**options, "max_train": 128})
    return base, npg


CERTIFY = ["--n0", "32", "--n", "300", "--max", "3", "--batch-size", "400", "--no-progress"]
ATTACK = ["--steps", "4", "--samples", "8", "--n", "500", "--no-progress"]


def test_certify_requires_paper_mode_for_an_input_dependent_npg_and_labels_it(runs, tmp_path, capsys):
    base, npg = runs
    assert main(["certify", str(npg), "--out", str(tmp_path / "refused.tsv"), *CERTIFY]) == 2
    assert "--paper-mode" in capsys.readouterr().err
    assert main(["certify", str(base), "--out", str(tmp_path / "x.tsv"), "--paper-mode", *CERTIFY]) == 2
    out = tmp_path / "paper.tsv"
    assert main(["certify", str(npg), "--out", str(out), "--paper-mode", *CERTIFY]) == 0
    assert "NOT a certificate" in capsys.readouterr().out
    rows = read_results(out)
    assert len(rows) == 3 and all(row["is_certificate"] is False for row in rows)
    assert read_sidecar(out)["config"]["mode"] == "paper" and read_sidecar(out)["config"]["is_certificate"] is False


def _as_text_without_time(rows):
    """Rows comparable with ==: as text (NaN != NaN), without the wall-clock column."""
    return [{k: str(v) for k, v in row.items() if k != "time"} for row in rows]


def test_attack_command_writes_rows_a_summary_and_resumes(runs, tmp_path, capsys):
    base, npg = runs
    results = tmp_path / "plain.tsv"
    assert main(["certify", str(base), "--out", str(results), *CERTIFY]) == 0
    out = tmp_path / "attack.tsv"
    assert main(["attack", str(results), "--out", str(out), "--max", "2", *ATTACK]) == 0
    first = read_results(out, ATTACK_SCHEMA)
    assert [row["idx"] for row in first] == [0, 1]
    assert main(["attack", str(results), "--out", str(out), *ATTACK, "--steps", "3"]) == 2  # another config
    capsys.readouterr()
    assert main(["attack", str(results), "--out", str(tmp_path / "full.tsv"), *ATTACK]) == 0
    assert "proven certificates" in capsys.readouterr().out
    rows = read_results(tmp_path / "full.tsv", ATTACK_SCHEMA)
    certified = read_results(results)
    assert [row["idx"] for row in rows] == [row["idx"] for row in certified]
    for row, cert in zip(rows, certified):
        assert row["predict"] == cert["predict"] and row["radius"] == cert["radius_l2"] and row["norm"] == "l2"
        assert row["attacked"] == (cert["predict"] != -1 and cert["radius_l2"] > 0)
        if row["attacked"]:
            assert row["delta_norm"] <= row["radius"] and row["method"] == "pgd"
        assert row["is_certificate"] is True
    # a larger --max extends the first file with the rows a single run would have written
    assert main(["attack", str(results), "--out", str(out), *ATTACK]) == 0
    assert _as_text_without_time(read_results(out, ATTACK_SCHEMA)) == _as_text_without_time(rows)
    summary = json.loads((tmp_path / "full.tsv.summary.json").read_text())
    assert summary["attacked"] == sum(row["attacked"] for row in rows) and summary["allowed_rate"] == 0.002
    # a paper-mode file: rebuilt as paper mode from the run, labelled in rows and summary
    paper = tmp_path / "paper.tsv"
    assert main(["certify", str(npg), "--out", str(paper), "--paper-mode", *CERTIFY]) == 0
    assert main(["attack", str(paper), "--out", str(tmp_path / "paper_attack.tsv"), *ATTACK]) == 0
    assert "NOT a certificate" in capsys.readouterr().out
    assert all(row["is_certificate"] is False for row in read_results(tmp_path / "paper_attack.tsv", ATTACK_SCHEMA))
