"""The sound input-adaptive modes end to end from the command line, on 512 real MNIST images:
`ucan train npg --kind noisy_shift | lipschitz_shift`, `ucan certify RUN` (rows labelled as proven
certificates, the Lipschitz radius is R / (1 + L) of the same p_lower), `ucan attack` on the result
files, checkpoint round trip and resume, and the errors for a wrong kind or option."""

import json
from pathlib import Path

import pytest
import torch

from ucan_smoothing import Gaussian, Smooth
from ucan_smoothing.npg import (
    LipschitzShiftNet,
    LipschitzShiftSmooth,
    NoisyInputShift,
    NoisyShiftNet,
    lipschitz_bounds,
)
from ucan_smoothing.attack import ATTACK_SCHEMA
from ucan_smoothing.core.grid import certify_grid
from ucan_smoothing.core.sequential import p_needed
from ucan_smoothing.core.pool import certify_grid_pool, certify_pool
from ucan_smoothing.cli import main
from ucan_smoothing.data import load_dataset
from ucan_smoothing.results import read_results, read_sidecar
from ucan_smoothing.runs import load_trained
from ucan_smoothing.training import read_metrics, train_classifier

SMALL = ["--max-train", "512", "--max-test", "64", "--epochs", "1", "--batch-size", "64", "--device", "cpu",
         "--threads", "1", "--no-progress"]
CERTIFY = ["--n0", "32", "--n", "300", "--max", "3", "--batch-size", "400", "--no-progress"]
ATTACK = ["--steps", "3", "--samples", "8", "--n", "300", "--batch-size", "300", "--no-progress"]
LIPSCHITZ = 0.8
#: the enforced cap gives gamma * cap^depth = L; the proven bound adds a 1e-4 relative margin for rounding
TOLERANCE = 1 + 2e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread per forward pass: small batches gain nothing from more, and on a loaded
    machine two OpenMP threads can be many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sound")
    try:
        base = train_classifier(max_train=512, max_test=64, epochs=2, batch_size=64, device="cpu", threads=1,
                                progress=False, seed=0, out=str(root / "base"))
    except FileNotFoundError as error:  # MNIST wheel not installed
        pytest.skip(str(error))
    noisy, lipschitz = root / "noisy", root / "lipschitz"
    assert main(["train", "npg", "--kind", "noisy_shift", "--base", str(base), *SMALL, "--out", str(noisy)]) == 0
    assert main(["train", "npg", "--kind", "lipschitz_shift", "--lipschitz", str(LIPSCHITZ), "--base", str(base),
                 *SMALL, "--out", str(lipschitz)]) == 0
    return Path(base), noisy, lipschitz


@pytest.fixture(scope="module")
def certified(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    files = {}
    for run in runs[1:]:
        out = root / f"{run.name}.tsv"
        assert main(["certify", str(run), "--out", str(out), *CERTIFY]) == 0
        files[run.name] = out
    return files


def test_training_writes_the_run_and_keeps_the_frozen_classifier(runs):
    base, noisy, lipschitz = runs
    for run, cls in ((noisy, NoisyShiftNet), (lipschitz, LipschitzShiftNet)):
        trained = load_trained(run, expected_noise=Gaussian(0.25))
        assert isinstance(trained.shift, cls) and trained.generator is None
        record = json.loads((run / "config.json").read_text())
        assert record["shift"] == trained.shift.describe() and record["config"]["npg"]["kind"] == cls.kind
        assert [row["epoch"] for row in read_metrics(run)] == [1]
        # the classifier was frozen (no --joint): the shift network is all that was trained
        base_state = torch.load(base / "final.pt", weights_only=True)["state_dict"]
        state = torch.load(run / "final.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(base_state[k], state[k]) for k in base_state)
        assert any(p.abs().sum() > 0 for p in trained.shift.parameters())  # it moved away from mu = 0
    assert load_trained(lipschitz).shift.describe()["lipschitz"] == LIPSCHITZ


def test_noisy_shift_rows_are_certificates_of_that_base_classifier(runs, certified):
    _, noisy, _ = runs
    rows = read_results(certified["noisy"])
    assert len(rows) == 3
    sidecar = read_sidecar(certified["noisy"])["config"]
    assert sidecar["npg"] == "noisy_shift" and sidecar["is_certificate"] is True and sidecar["mode"] == "certify"
    trained = load_trained(noisy)
    smooth = Smooth(NoisyInputShift(trained.model, trained.shift), 10, Gaussian(0.25))
    data = load_dataset("mnist", "test")
    # exactly what `ucan certify` computed: the same classifier, the same noise streams (seed 0)
    pooled = certify_pool(smooth, [(row["idx"], data[row["idx"]][0]) for row in rows], 32, 300, 0.001, seed=0)
    for row, (idx, cert, _) in zip(rows, pooled):
        assert row["npg"] == "noisy_shift" and row["is_certificate"] is True and row["noise"] == "gaussian:0.25"
        assert idx == row["idx"] and (cert.prediction, cert.p_lower) == (row["predict"], row["p_lower"])
        assert cert.radius(2) == pytest.approx(row["radius_l2"], rel=1e-12)
    assert any(row["predict"] != -1 for row in rows)


def test_lipschitz_rows_shrink_the_radius_by_one_plus_l(runs, certified):
    _, _, lipschitz = runs
    trained = load_trained(lipschitz)
    bound = trained.lipschitz()
    assert 0 < bound <= LIPSCHITZ * TOLERANCE  # the cap enforces the chosen L
    assert bound == lipschitz_bounds(trained.shift, Gaussian(0.25))[2]
    assert isinstance(trained.smoothed(), LipschitzShiftSmooth)
    rows = read_results(certified["lipschitz"])
    assert read_sidecar(certified["lipschitz"])["config"]["is_certificate"] is True
    for row in rows:
        assert row["npg"] == f"lipschitz_shift:L={bound:.4g}" and row["is_certificate"] is True
        if row["predict"] == -1:
            assert row["radius"] == 0
            continue
        base_radius = Gaussian(0.25).radius(row["p_lower"], 2, 784)
        assert row["radius"] == pytest.approx(base_radius / (1 + bound), rel=1e-9)
        assert row["radius_l2"] == row["radius"]
    assert any(row["predict"] != -1 for row in rows)


def shifted_items(trained, rows):
    """``(idx, x + mu(x))`` of the rows' images: what the pool of a lipschitz_shift run certifies."""
    data, smooth = load_dataset("mnist", "test"), trained.smoothed()
    return [(row["idx"], smooth.shift(data[row["idx"]][0][None])[0]) for row in rows]


def test_lipschitz_rows_are_the_fixed_noise_rows_at_the_shifted_image(runs, certified):
    """The pool runs the fixed-noise classifier on x + mu(x); the rows are its certificates with
    every radius times 1 / (1 + L)."""
    trained = load_trained(runs[2])
    rows = read_results(certified["lipschitz"])
    assert read_sidecar(certified["lipschitz"])["config"]["noise_streams"].startswith("pool-quanta")
    inner, factor = trained.smoothed().smooth, 1 / (1 + trained.lipschitz())
    pooled = certify_pool(inner, shifted_items(trained, rows), 32, 300, 0.001, seed=0)
    for row, (idx, cert, _) in zip(rows, pooled):
        assert idx == row["idx"] and (cert.prediction, cert.p_lower) == (row["predict"], row["p_lower"])
        assert row["radius_l2"] == pytest.approx(cert.radius(2) * factor, rel=1e-12)


def test_lipschitz_grid_and_radius_modes_decide_the_radii_times_one_plus_l(runs, tmp_path):
    trained = load_trained(runs[2])
    smooth = trained.smoothed()
    one_plus_l = 1 + trained.lipschitz()
    radii = [0.0, 0.1, 0.2]
    grid, single = tmp_path / "grid.tsv", tmp_path / "radius.tsv"
    options = ["--n0", "32", "--n", "2000", "--max", "3", "--batch-size", "256", "--no-progress"]
    assert main(["certify", str(runs[2]), "--out", str(grid), "--radii", *map(str, radii), "--norm", "l2",
                 *options]) == 0
    rows = read_results(grid)
    config = read_sidecar(grid)["config"]
    assert config["mode"] == "grid-cp" and config["radii"] == radii and config["is_certificate"] is True
    # the same decisions as the fixed-noise grid at r (1 + L) on the shifted images, reported at r
    scaled = smooth.shifted_radii(radii, 2)
    assert scaled == pytest.approx([r * one_plus_l for r in radii], rel=1e-9)
    decisions = certify_grid_pool(smooth.smooth, shifted_items(trained, rows), scaled, 2, 0.001, seed=0, n0=32,
                                  max_n=2000)
    for row, (idx, decision, _) in zip(rows, decisions):
        assert idx == row["idx"] and decision.p_lower == row["p_lower"]
        expected = max((r for r, ok in zip(radii, decision.certified) if ok), default=0.0)
        assert row["grid_radius"] == expected and row["samples_used"] == decision.samples_used
        if row["predict"] != -1:  # the region at p_lower, shrunk by 1 / (1 + L), holds the grid radius
            assert row["radius_l2"] >= row["grid_radius"]
            assert row["radius_l2"] == pytest.approx(Gaussian(0.25).radius(row["p_lower"], 2, 784) / one_plus_l,
                                                     rel=1e-9)
    assert any(row["grid_radius"] > 0 for row in rows)
    # one radius: the staged test at 0.1 (1 + L); a certified row's region holds 0.1
    assert main(["certify", str(runs[2]), "--out", str(single), "--radius", "0.1", *options]) == 0
    decided = read_results(single)
    assert [row["decided_radius"] for row in decided] == [0.1] * 3
    assert all(row["radius_l2"] >= 0.1 for row in decided if row["certified"])
    assert any(row["certified"] for row in decided)
    # the Python API gives the same grid decision for one image
    x = load_dataset("mnist", "test")[rows[0]["idx"]][0]
    mine = smooth.certify_grid(x, radii, 2, 0.001, n0=32, max_n=2000, generator=torch.Generator().manual_seed(1))
    theirs = certify_grid(smooth.smooth, smooth.shift(x[None])[0], scaled, 2, 0.001, n0=32, max_n=2000,
                          generator=torch.Generator().manual_seed(1))
    assert mine.radii == tuple(radii) and mine.certified == theirs.certified
    assert mine.certified_radius == max((r for r, ok in zip(radii, theirs.certified) if ok), default=0.0)
    one = smooth.certify_radius(x, 0.1, 2, 0.001, n0=32, max_n=2000, generator=torch.Generator().manual_seed(1))
    assert one.radius == 0.1
    assert one.p_needed == pytest.approx(p_needed(Gaussian(0.25), 0.1 * one_plus_l, 2, (1, 28, 28)), rel=1e-9)


def test_attack_reads_both_result_files(certified, tmp_path, capsys):
    for name, results in certified.items():
        out = tmp_path / f"{name}.attack.tsv"
        assert main(["attack", str(results), "--out", str(out), *ATTACK]) == 0
        assert "proven certificates" in capsys.readouterr().out
        rows = read_results(out, ATTACK_SCHEMA)
        assert [row["idx"] for row in rows] == [row["idx"] for row in read_results(results)]
        for row in rows:
            assert row["is_certificate"] is True
            if row["attacked"]:
                assert row["method"] == "pgd" and row["delta_norm"] <= row["radius"]
        summary = json.loads(Path(f"{out}.summary.json").read_text())
        assert summary["is_certificate"] is True and summary["attacked"] == sum(r["attacked"] for r in rows)


def test_checkpoint_round_trip_and_resume(runs, tmp_path):
    _, _, lipschitz = runs
    saved = torch.load(lipschitz / "final.pt", weights_only=True)["extra"]
    first, second = load_trained(lipschitz), load_trained(lipschitz / "last.pt")
    for key, value in saved["shift_state"].items():
        assert torch.equal(first.shift.state_dict()[key], value)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(first.shift(x), second.shift(x))
    assert first.lipschitz() == second.lipschitz() and first.description() == second.description()
    # resume to a second epoch: the shift network comes back from last.pt and keeps training
    assert main(["train", "--resume", "--out", str(lipschitz), "--epochs", "2", "--threads", "1",
                 "--no-progress"]) == 0
    assert [row["epoch"] for row in read_metrics(lipschitz)] == [1, 2]
    resumed = load_trained(lipschitz)
    assert not all(torch.equal(resumed.shift.state_dict()[k], v) for k, v in saved["shift_state"].items())
    assert resumed.lipschitz() <= LIPSCHITZ * TOLERANCE


@pytest.mark.parametrize("argv, match", [
    (["train", "classifier", "--kind", "noisy_shift"], "train npg"),
    (["train", "npg", "--kind", "lipschitz_shift"], "--base"),
    (["train", "npg", "--kind", "universal", "--lipschitz", "0.5", "--joint"], "bad parameters"),
    (["train", "npg", "--kind", "lipschitz_shift", "--lipschitz", "-1", "--joint"], "lipschitz must be"),
    (["train", "npg", "--kind", "universal", "--npg-checkpoint", "x.pt", "--joint"], "npg-checkpoint"),
])
def test_wrong_kinds_and_options_are_refused(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_certify_refuses_modes_that_do_not_apply(runs, tmp_path, capsys):
    base, noisy, lipschitz = runs
    assert main(["certify", str(noisy), "--out", str(tmp_path / "a.tsv"), "--paper-mode", *CERTIFY]) == 2
    assert "only for runs with an input-dependent generator" in capsys.readouterr().err
    # a Lipschitz bound holds in the norm it was proven for (l2) only
    assert main(["certify", str(lipschitz), "--out", str(tmp_path / "b.tsv"), "--radii", "0", "0.1", "--norm", "l1",
                 *CERTIFY]) == 2
    assert "no proven Lipschitz bound of mu in l1" in capsys.readouterr().err
    assert not (tmp_path / "b.tsv").exists()
    # a shift kind's fixed noise must come from a run with a fixed generator
    assert main(["train", "npg", "--kind", "noisy_shift", "--base", str(base), "--npg-checkpoint", str(base),
                 *SMALL, "--out", str(tmp_path / "bad")]) == 2
    assert "no noise parameter generator" in capsys.readouterr().err
