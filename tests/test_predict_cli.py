"""`ucan predict`: Cohen's PREDICT over a split, rows in Cohen's predict layout, resumable."""

import pytest

from ucan_smoothing.cli import main
from ucan_smoothing.core.pool import predict_pool
from ucan_smoothing.data import load_dataset
from ucan_smoothing.results import read_results, read_sidecar
from ucan_smoothing.runs import load_trained


@pytest.fixture
def run_dir(mnist_run):
    return mnist_run


def predict_args(run_dir, out, *extra):
    return ["predict", str(run_dir), "--out", str(out), "--n", "400", "--skip", "5", "--max", "6",
            "--batch-size", "256", "--no-progress", "--no-contract-check", *extra]


def test_predict_rows_are_cohens_predict(run_dir, tmp_path):
    out = tmp_path / "p.tsv"
    assert main(predict_args(run_dir, out)) == 0
    header = out.read_text().splitlines()[0].split("\t")
    assert header[:5] == ["idx", "label", "predict", "correct", "time"]
    rows = read_results(out)
    assert [row["idx"] for row in rows] == [0, 5, 10, 15, 20, 25]
    smooth = load_trained(run_dir).smoothed()
    data = load_dataset("mnist", "test")
    expected = list(predict_pool(smooth, [(i, data[i][0]) for i in (0, 5, 10, 15, 20, 25)], 400, 0.001, seed=0))
    for row, (idx, prediction, _) in zip(rows, expected):
        assert (row["idx"], row["predict"], row["top_count"]) == (idx, prediction.prediction, prediction.top_count)
        assert row["correct"] == int(row["predict"] == row["label"]) and row["is_certificate"] is True
        assert row["top_count"] + row["runner_up_count"] <= 400
    assert read_sidecar(out)["config"]["mode"] == "predict"


def test_predict_resumes_and_extends(run_dir, tmp_path):
    out = tmp_path / "p.tsv"
    assert main(predict_args(run_dir, out, "--max", "3")) == 0
    assert main(predict_args(run_dir, out)) == 0
    reference = tmp_path / "ref.tsv"
    assert main(predict_args(run_dir, reference)) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(read_results(out)) == strip(read_results(reference))


def test_predict_refuses_bad_options_before_writing(run_dir, tmp_path, capsys):
    out = tmp_path / "p.tsv"
    assert main(predict_args(run_dir, out, "--alpha", "1.5")) == 2
    assert "alpha" in capsys.readouterr().err and not out.exists()
