"""`ucan demo` end to end on a tiny protocol: trains three methods, certifies, analyses."""

import pytest

from ucan_smoothing.cli import main
from ucan_smoothing.results import read_results


def test_demo_runs_end_to_end_and_reuses_finished_work(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--max-train", "300", "--epochs", "1", "--images", "4",
            "--n", "100", "--n0", "20", "--no-progress"]
    try:
        assert main(argv) == 0
    except FileNotFoundError as error:  # MNIST wheel absent
        pytest.skip(str(error))
    printed = capsys.readouterr().out
    assert "reduced protocol" in printed and "not a certified radius" in printed
    for name in ("isotropic", "pattern_p2", "universal"):
        rows = read_results(tmp_path / "results" / f"{name}.tsv")
        assert len(rows) == 4 and all(row["is_certificate"] for row in rows)
    for name in ("summary.md", "summary.csv", "certified_accuracy.png", "sigma_maps.png"):
        assert (tmp_path / "analysis" / name).stat().st_size > 0
    stamp = (tmp_path / "isotropic" / "final.pt").stat().st_mtime_ns
    assert main(argv) == 0  # second run reuses the trained runs and result rows
    assert (tmp_path / "isotropic" / "final.pt").stat().st_mtime_ns == stamp
