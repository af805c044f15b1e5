"""The semi-elastic level (Sukenik et al.) from the command line: `ucan train npg --kind elastic_sigma`,
its proven elasticity bound, and `ucan certify` / `ucan attack` on the run."""

import subprocess
import sys

import pytest
import torch

from ucan_smoothing.npg.generators import ElasticSigmaGenerator, generator_from_config
from ucan_smoothing.results import read_results


def test_the_proven_elasticity_bounds_the_level_and_respects_the_cap():
    torch.manual_seed(0)
    generator = ElasticSigmaGenerator((1, 8, 8), elasticity=0.05, gamma=0.5, hidden=16)
    with torch.no_grad():  # far larger weights than the cap allows: the cap must still hold
        for layer in generator.net.layers:
            layer.weight.normal_(0, 3.0)
            layer.bias.normal_(0, 1.0)
    bound = generator.elasticity_bound()
    assert 0 < bound <= 0.05 * (1 + 1e-3)
    x, y = torch.rand(256, 1, 8, 8), torch.rand(256, 1, 8, 8)
    with torch.no_grad():
        ratio = (generator.level(x).log() - generator.level(y).log()).abs() / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound
    rebuilt = generator_from_config(generator.describe(), generator.state_dict())
    assert torch.equal(rebuilt.level(x), generator.level(x))
    sigma, mu = generator(x)
    assert sigma.shape == x.shape and not mu.any() and torch.equal(sigma[:, 0, 0, 0], generator.level(x))


def ucan(*args):
    return subprocess.run([sys.executable, "-m", "ucan_smoothing.cli", *map(str, args)], capture_output=True,
                          text=True)


def test_elastic_sigma_trains_certifies_and_is_attacked_from_the_cli(tmp_path, mnist_run):
    run = tmp_path / "elastic"
    done = ucan("train", "npg", "--kind", "elastic_sigma", "--elasticity", "0.02", "--base", mnist_run,
                "--max-train", 128, "--max-test", 32, "--epochs", 1, "--no-progress", "--out", run)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "elastic.tsv"
    done = ucan("certify", run, "--out", out, "--n0", 20, "--n", 300, "--max", 2, "--skip", 50,
                "--no-contract-check", "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = read_results(out)
    from scipy import stats
    for row in rows:
        assert row["is_certificate"] and row["npg"].startswith("elastic_sigma:r=")
        assert float(row["npg"].split("=")[1]) <= 0.02 * 1.001
        assert row["level"] > 0 and row["noise"] == "gaussian:0.25"
        # the elastic radius never exceeds Cohen's at the image's own level
        cohen = row["level"] * stats.norm.ppf(row["p_lower"]) if row["p_lower"] > 0.5 else 0.0
        assert row["radius_l2"] <= cohen + 1e-12
    done = ucan("attack", out, "--out", tmp_path / "attack.tsv", "--n", 200, "--steps", 2, "--samples", 8,
                "--no-progress")
    assert done.returncode == 0, done.stderr
    done = ucan("certify", run, "--out", tmp_path / "seq.tsv", "--radius", 0.5, "--n", 1000)
    assert done.returncode == 2 and "sequential modes" in done.stderr and not (tmp_path / "seq.tsv").exists()
