"""`ucan certify` / `ucan attack` on models not trained here: a Cohen-layout checkpoint, a factory and a
TorchScript file, with the input-contract check printed first (or stopping the run)."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from ucan_smoothing import Gaussian
from ucan_smoothing.cli import main
from ucan_smoothing.core.pool import certify_pool
from ucan_smoothing.data import has_wheel_data, load_dataset
from ucan_smoothing.results import read_results, read_sidecar
from ucan_smoothing.runs import load_model

from test_own_model import cohen_checkpoint

needs_foolbox = pytest.mark.skipif(not has_wheel_data("foolbox"), reason="foolbox sample images not installed")
SMALL = ["--n0", "20", "--n", "200", "--max", "2", "--batch-size", "128", "--no-progress"]


@needs_foolbox
def test_cohen_checkpoint_through_the_cli_gives_the_python_api_rows(tmp_path, capsys):
    path, _ = cohen_checkpoint(tmp_path)
    out = tmp_path / "r.tsv"
    # random weights classify at chance: the contract check would stop the run, so it is waived (and says so)
    assert main(["certify", str(path), "--noise", "gaussian", "--scale", "0.25", "--split", "foolbox",
                 "--out", str(out), "--no-contract-check", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert printed.index("input contract: clean accuracy") < printed.index("wrote ")
    rows = read_results(out)
    config = read_sidecar(out)["config"]
    assert config["model_format"] == "cohen" and config["arch"] == "cifar_resnet20"
    assert config["normalization"]["std"] == pytest.approx([0.2023, 0.1994, 0.2010])
    assert config["contract"]["images"] == 20 and "batch_probe" in config

    smooth = load_model(path, noise=Gaussian(0.25)).smoothed()
    data = load_dataset("cifar10", "foolbox")
    pooled = list(certify_pool(smooth, [(i, data[i][0]) for i in (0, 1)], 20, 200, 0.001, seed=0))
    assert [(r["idx"], r["predict"], r["p_lower"]) for r in rows] == [
        (idx, cert.prediction, cert.p_lower) for idx, cert, _ in pooled]
    assert all(r["noise"] == "gaussian:0.25" and r["npg"] == "none" for r in rows)


@needs_foolbox
def test_the_contract_check_stops_a_broken_model_before_anything_is_written(tmp_path, capsys):
    path, _ = cohen_checkpoint(tmp_path)
    out = tmp_path / "results" / "r.tsv"
    assert main(["certify", str(path), "--noise", "gaussian", "--scale", "0.25", "--split", "foolbox",
                 "--out", str(out), *SMALL]) == 2
    captured = capsys.readouterr()
    assert "input contract: clean accuracy" in captured.out
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and "chance" in error[0] and "--no-contract-check" in error[0]
    assert not (tmp_path / "results").exists()


@needs_foolbox
def test_cohen_checkpoint_with_sigma_file_radius_and_attack(tmp_path):
    path, _ = cohen_checkpoint(tmp_path)
    sigma = torch.ones(3, 32, 32)
    sigma[:, :, 16:] = 2.0
    torch.save(sigma, tmp_path / "sigma.pt")
    common = ["--noise", "gaussian", "--scale", "0.25", "--sigma", str(tmp_path / "sigma.pt"), "--split", "foolbox",
              "--no-contract-check", *SMALL]
    out = tmp_path / "r.tsv"
    assert main(["certify", str(path), "--out", str(out), *common]) == 0
    assert main(["certify", str(path), "--out", str(tmp_path / "seq.tsv"), "--radius", "0.1", *common,
                 "--n", "2000"]) == 0
    config = read_sidecar(out)["config"]
    assert config["npg"] == "fixed_sigma" and config["noise"]["anisotropic"] and config["noise"]["sigma_max"] == 2.0
    assert all(row["npg"] == "fixed_sigma" for row in read_results(out))
    assert all(row["decided_radius"] == 0.1 for row in read_results(tmp_path / "seq.tsv"))
    # the attack reopens the same model and noise from the sidecar
    assert main(["attack", str(out), "--out", str(tmp_path / "a.tsv"), "--max", "1", "--n", "200",
                 "--steps", "2", "--samples", "4", "--no-progress"]) == 0
    assert len(read_results(tmp_path / "a.tsv")) == 1


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def linear():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
""")


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "cli_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_models:linear"
    sys.modules.pop("cli_models", None)


def test_factory_and_torchscript_models_through_the_cli(tmp_path, factory):
    try:
        load_dataset("mnist", "test")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    common = ["--dataset", "mnist", "--noise", "gaussian", "--scale", "0.5", "--no-contract-check", *SMALL]
    assert main(["certify", "--model", factory, "--out", str(tmp_path / "f.tsv"), *common]) == 0
    torch.manual_seed(0)
    scripted = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    scripted.save(str(tmp_path / "m.ts"))
    assert main(["certify", str(tmp_path / "m.ts"), "--out", str(tmp_path / "t.tsv"), *common]) == 0
    # the same weights, so the same rows
    strip = [{k: v for k, v in row.items() if k != "time"} for row in read_results(tmp_path / "f.tsv")]
    assert strip == [{k: v for k, v in row.items() if k != "time"} for row in read_results(tmp_path / "t.tsv")]
    assert read_sidecar(tmp_path / "f.tsv")["config"]["factory"] == factory


@pytest.mark.parametrize("extra, message", [
    (["--noise", "gaussian"], "needs --scale"),
    (["--scale", "0.5"], "need --noise"),
    (["--noise", "gaussian", "--scale", "0.5", "--num-classes", "1"], "--num-classes must be >= 2"),
    ([], "give its noise with --noise"),
])
def test_external_model_option_errors(tmp_path, factory, capsys, extra, message):
    out = tmp_path / "r.tsv"
    assert main(["certify", "--model", factory, "--dataset", "mnist", "--out", str(out), *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not out.exists()
