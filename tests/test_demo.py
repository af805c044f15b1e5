"""`ucan demo` end to end on a tiny protocol: trains three methods, certifies, analyses; two runs with
the same seed and thread count give the same table, bit for bit; the README shows the demo's table."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from ucan_smoothing.cli import main
from ucan_smoothing.commands.demo import HEADLINE, headline_table
from ucan_smoothing.results import read_results

ARGV = ["demo", "--max-train", "300", "--epochs", "1", "--images", "4", "--n", "100", "--n0", "20", "--no-progress"]
RUNS = ("isotropic", "pattern_p2", "universal")
README = Path(__file__).resolve().parents[1] / "README.md"


def run_demo(out) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*ARGV, "--out", str(out)]) == 0
    return printed.getvalue()


def tensors(checkpoint, prefix="") -> dict:
    """Every tensor of a checkpoint (classifier and NPG weights) by its dotted path."""
    if isinstance(checkpoint, torch.Tensor):
        return {prefix: checkpoint}
    items = checkpoint.items() if isinstance(checkpoint, dict) else \
        enumerate(checkpoint) if isinstance(checkpoint, (list, tuple)) else ()
    return {key: value for name, item in items for key, value in tensors(item, f"{prefix}.{name}").items()}


@pytest.fixture(scope="module")
def two_demos(tmp_path_factory):
    """Two demo runs in fresh folders, same seed, same threads (the process's): (folder, printed) each."""
    folders = [tmp_path_factory.mktemp("demo_a"), tmp_path_factory.mktemp("demo_b")]
    try:
        return [(folder, run_demo(folder)) for folder in folders]
    except FileNotFoundError as error:  # MNIST wheel absent
        pytest.skip(str(error))


def test_demo_runs_end_to_end_and_reuses_finished_work(two_demos):
    out, printed = two_demos[0]
    assert "reduced protocol" in printed and "not a certified radius" in printed
    for name in RUNS:
        rows = read_results(out / "results" / f"{name}.tsv")
        assert len(rows) == 4 and all(row["is_certificate"] for row in rows)
    for name in ("demo_table.md", "summary.md", "summary.csv", "certified_accuracy.png", "sigma_maps.png"):
        assert (out / "analysis" / name).stat().st_size > 0
    assert (out / "analysis" / "demo_table.md").read_text() in printed
    stamp = (out / "isotropic" / "final.pt").stat().st_mtime_ns
    again = run_demo(out)  # a second run reuses the trained runs and result rows
    assert (out / "isotropic" / "final.pt").stat().st_mtime_ns == stamp
    assert "reused from an earlier run" in again
    assert json.loads((out / "demo.json").read_text())["reused"] == [
        *(str(out / name) for name in RUNS), *(str(out / "results" / f"{name}.tsv") for name in RUNS)]


def test_demo_prints_and_records_the_conditions_of_its_numbers(two_demos):
    out, printed = two_demos[1]
    threads = torch.get_num_threads()
    assert printed.startswith(f"conditions: torch {torch.__version__}, {threads} torch threads")
    record = json.loads((out / "demo.json").read_text())
    assert record["format"] == "ucan-demo-v1" and record["reused"] == []
    assert record["conditions"]["torch_threads"] == threads and record["conditions"]["seed"] == 0
    assert record["conditions"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert record["options"]["n"] == 100 and record["environment"]["torch"]
    assert record["seconds"] > 0
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert analysis["format"] == "ucan-analysis-v1"
    assert [entry["path"] for entry in analysis["inputs"]] == [str(out / "results" / f"{n}.tsv") for n in RUNS]
    assert len(analysis["sigma"]) == 2


def test_demo_is_deterministic_for_one_seed_and_thread_count(two_demos):
    (a, _), (b, _) = two_demos
    assert (a / "analysis" / "demo_table.md").read_bytes() == (b / "analysis" / "demo_table.md").read_bytes()
    for name in RUNS:  # the cause, not only the rounded table: the same weights and the same rows
        weights_a, weights_b = (tensors(torch.load(folder / name / "final.pt", weights_only=True))
                                for folder in (a, b))
        assert weights_a.keys() == weights_b.keys()
        assert any(".npg_state." in key for key in weights_a) == (name == "universal")  # pattern: none to learn
        assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a), name
        rows_a, rows_b = (read_results(folder / "results" / f"{name}.tsv") for folder in (a, b))
        assert [{k: v for k, v in row.items() if k != "time"} for row in rows_a] == [
            {k: v for k, v in row.items() if k != "time"} for row in rows_b]


def test_headline_table_reads_the_summary():
    row = {"method": "m"}
    for i, (norm, radius) in enumerate(HEADLINE):
        key = f"ALM (volume figure, not a certified radius) >= {radius:g}" if norm == "alm" else \
            f"certified accuracy {'l_inf' if norm == 'linf' else norm} >= {radius:g}"
        row[key] = (90 - i) / 100
    lines = headline_table([row]).splitlines()
    assert lines[0] == ("| method | l2 >= 0 | l2 >= 0.25 | l2 >= 0.5 | l2 >= 0.75 | l2 >= 1 | l_inf >= 0.02 | "
                        "ALM >= 0.75 (volume figure, not a certified radius) |")
    assert lines[2] == "| m | 90 | 89 | 88 | 87 | 86 | 85 | 84 |"


def test_readme_shows_the_table_in_the_demos_format():
    section = re.search(r"\n## The demo\n(.*?)\n## ", README.read_text(), re.DOTALL).group(1)
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table[0] == headline_table([]).splitlines()[0]
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| isotropic Gaussian", "| pattern-fixed (p=2)", "| universal"]
