"""`ucan certify --radii`: a whole certified-accuracy table in one sequential pass, read by `ucan analyze`."""

import pytest

from ucan_smoothing.analysis import accuracy_key, load_method, summarize
from ucan_smoothing.cli import main
from ucan_smoothing.results import read_results, read_sidecar
from ucan_smoothing.training import train_classifier

RADII = ["0", "0.25", "0.5", "0.75"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    try:
        return train_classifier(max_train=512, max_test=64, epochs=1, out=str(tmp_path_factory.mktemp("run") / "r"),
                                progress=False, seed=0, scale=0.5)
    except FileNotFoundError as error:  # MNIST wheel not installed
        pytest.skip(str(error))


def grid_args(run_dir, out, *extra):
    return ["certify", str(run_dir), "--out", str(out), "--radii", *RADII, "--norm", "l2", "--n", "2000",
            "--n0", "50", "--skip", "7", "--max", "4", "--no-progress", "--no-contract-check", *extra]


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    """One grid file at batch size 256, the rows the other runs must reproduce."""
    out = tmp_path_factory.mktemp("grid") / "grid.tsv"
    assert main(grid_args(run_dir, out, "--batch-size", "256")) == 0
    return out


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def test_grid_rows_and_the_table_analyze_reads(reference):
    out = reference
    rows = read_results(out)
    config = read_sidecar(out)["config"]
    assert config["mode"] == "grid-cp" and config["radii"] == [0.0, 0.25, 0.5, 0.75] and config["norm"] == "l2"
    for row in rows:
        assert row["mode"] == "grid-cp" and row["grid_radius"] in (0.0, 0.25, 0.5, 0.75)
        assert row["samples_used"] <= 50 + 2000
        # the stopping bound is a valid p_lower, and its radius reaches the grid's answer
        if row["predict"] != -1:
            assert row["radius_l2"] >= row["grid_radius"] - 1e-9
    method = load_method(out)
    assert method.kind == "grid" and method.grid_norm == "l2"
    summary = summarize([method], radii={"l2": [0.0, 0.25, 0.5, 0.75]})[0]
    for r in (0.0, 0.25, 0.5, 0.75):
        exact = sum(row["correct"] == 1 and row["grid_radius"] >= r for row in rows) / len(rows)
        assert summary[accuracy_key("l2", r)] == exact
    assert summary["samples per image"] < 50 + 2000  # it stopped early somewhere
    assert summary["format"].startswith("grid (grid-cp, l2")


def test_a_resumed_grid_file_with_another_batch_and_pool_size_has_the_same_rows(run_dir, reference, tmp_path):
    out = tmp_path / "g.tsv"
    assert main(grid_args(run_dir, out, "--batch-size", "96", "--pool-size", "2", "--max", "2")) == 0
    assert main(grid_args(run_dir, out, "--batch-size", "1000")) == 0  # extends it: the speed keys may change
    assert without_time(read_results(out)) == without_time(read_results(reference))


def test_unreachable_grid_radius_is_refused_before_writing(run_dir, tmp_path, capsys):
    out = tmp_path / "x.tsv"
    assert main(["certify", str(run_dir), "--out", str(out), "--radii", "0", "99", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "grid radius 99 in l2 cannot be certified" in error[0]
    assert not out.exists()


@pytest.mark.parametrize("key, value", [("grid_stages", "aligned"), ("grid_futility", "reach-0.01")])
def test_a_grid_file_of_an_earlier_protocol_is_not_extended(run_dir, tmp_path, capsys, key, value):
    """A grid file written before the aligned stages or the futility rule (b) (no ``grid_stages``,
    no ``grid_futility`` in its config) used other stages or stopped elsewhere: resuming it would mix
    two protocols in one file, so it is refused, the file untouched."""
    import json

    out = tmp_path / "old.tsv"
    assert main(grid_args(run_dir, out, "--max", "2")) == 0
    sidecar = out.with_suffix(".tsv.json")
    record = json.loads(sidecar.read_text())
    assert record["config"][key] == value
    del record["config"][key]
    sidecar.write_text(json.dumps(record))
    before = out.read_text()
    capsys.readouterr()
    assert main(grid_args(run_dir, out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and key in error[0]
    assert out.read_text() == before
