"""`ucan certify --float-sound`: certificates that hold for the executed floating-point arithmetic."""

import pytest

from ucan_smoothing.cli import main
from ucan_smoothing.results import read_results, read_sidecar


@pytest.fixture
def run_dir(mnist_run):
    return mnist_run


def args(run_dir, out, *extra):
    return ["certify", str(run_dir), "--out", str(out), "--n0", "20", "--n", "300", "--max", "3", "--skip", "9",
            "--batch-size", "128", "--no-progress", "--no-contract-check", *extra]


def test_every_row_says_whether_it_is_float_sound(run_dir, tmp_path):
    plain, sound = tmp_path / "plain.tsv", tmp_path / "sound.tsv"
    assert main(args(run_dir, plain)) == 0
    assert main(args(run_dir, sound, "--float-sound")) == 0
    assert all(row["float_sound"] is False for row in read_results(plain))
    rows = read_results(sound)
    assert all(row["float_sound"] is True and row["noise"].startswith("rounded_gaussian:0.25") for row in rows)
    config = read_sidecar(sound)["config"]
    assert config["float_sound"] is True and config["noise"]["float_sound"] is True
    for row in rows:
        if row["predict"] != -1:  # Cohen's radius at p_lower less a negligible total-variation term
            assert row["radius_l2"] <= 0.25 * 4.0


def test_float_sound_refuses_what_it_cannot_make_sound(run_dir, tmp_path, capsys):
    out = tmp_path / "x.tsv"
    assert main(args(run_dir, out, "--float-sound", "--amp", "bf16")) == 2
    assert "drop --amp" in capsys.readouterr().err and not out.exists()
