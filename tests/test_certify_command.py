"""`ucan certify`: rows, resume after a real kill, refusal of a changed config,
sequential mode and a two-process run that merges into the single-process file."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ucan_smoothing.cli import main
from ucan_smoothing.results import read_results, read_sidecar


@pytest.fixture
def run_dir(mnist_run):
    return mnist_run


def certify_args(run_dir, out, *extra):
    return ["certify", str(run_dir), "--out", str(out), "--n0", "32", "--n", "300", "--skip", "3", "--max", "8",
            "--batch-size", "400", "--no-progress", *extra]


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def test_rows_follow_the_result_format(run_dir, tmp_path):
    out = tmp_path / "cert.tsv"
    assert main(certify_args(run_dir, out)) == 0
    rows = read_results(out)
    assert [row["idx"] for row in rows] == [0, 3, 6, 9, 12, 15, 18, 21]
    header = out.read_text().splitlines()[0].split("\t")
    assert header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    for row in rows:
        assert row["noise"] == "gaussian:0.25" and row["npg"] == "none" and row["is_certificate"] is True
        assert row["radius"] == row["radius_l2"] >= row["radius_linf"]
        assert row["correct"] == int(row["predict"] == row["label"])
    sidecar = read_sidecar(out)
    assert sidecar["config"]["n"] == 300 and "torch" in str(sidecar["runs"][0])


def test_resume_after_a_real_kill_gives_the_uninterrupted_rows(run_dir, tmp_path):
    reference = tmp_path / "reference.tsv"
    assert main(certify_args(run_dir, reference, "--n", "4000")) == 0
    out = tmp_path / "killed.tsv"
    command = [sys.executable, "-m", "ucan_smoothing.cli", *certify_args(run_dir, out, "--n", "4000")]
    for _ in range(2):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = len(read_results(out)) if out.exists() else 0
        deadline = time.time() + 60
        while time.time() < deadline and process.poll() is None:
            if out.exists() and out.read_text().count("\n") > before + 2:  # header + at least 2 new rows
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(read_results(out)) < 8, "the run finished before it could be killed"
    assert main(certify_args(run_dir, out, "--n", "4000")) == 0
    assert without_time(read_results(out)) == without_time(read_results(reference))


def test_a_changed_config_is_refused(run_dir, tmp_path):
    out = tmp_path / "cert.tsv"
    assert main(certify_args(run_dir, out)) == 0
    assert main(certify_args(run_dir, out, "--alpha", "0.01")) == 2


def test_a_radius_file_of_the_earlier_futility_rule_is_not_extended(run_dir, tmp_path, capsys):
    """A ``--radius`` file written before the budget futility rule (no ``radius_futility`` in its
    config) stopped on the upper bound alone: resuming it would mix two stopping rules in one file,
    so it is refused with one line and the file stays as it was."""
    import json

    out = tmp_path / "old.tsv"
    assert main(certify_args(run_dir, out, "--radius", "0.25", "--n", "2000", "--max", "2")) == 0
    sidecar = out.with_suffix(".tsv.json")
    record = json.loads(sidecar.read_text())
    assert record["config"]["radius_futility"] == "reach-0.01"
    del record["config"]["radius_futility"]
    sidecar.write_text(json.dumps(record))
    before = out.read_text()
    capsys.readouterr()
    assert main(certify_args(run_dir, out, "--radius", "0.25", "--n", "2000")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "radius_futility" in error[0]
    assert out.read_text() == before


def test_memory_layout_is_recorded_and_may_change_on_resume(run_dir, tmp_path):
    plain, fast = tmp_path / "plain.tsv", tmp_path / "fast.tsv"
    assert main(certify_args(run_dir, plain, "--no-channels-last")) == 0
    assert main(certify_args(run_dir, fast, "--max", "4")) == 0  # default: channels-last weights
    assert read_sidecar(fast)["config"]["channels_last"] is True
    assert main(certify_args(run_dir, fast, "--no-channels-last")) == 0  # resumes: rounding-only change
    a, b = read_results(plain), read_results(fast)
    assert [r["idx"] for r in a] == [r["idx"] for r in b]
    assert [r["predict"] for r in a] == [r["predict"] for r in b]
    # the counts may differ by a rounding flip of a sample near a decision boundary, no more
    assert all(abs(x["p_lower"] - y["p_lower"]) < 0.01 for x, y in zip(a, b))


def test_mixed_precision_certifies_the_autocast_classifier(run_dir, tmp_path):
    from ucan_smoothing.attack import load_target
    from ucan_smoothing.models import Autocast

    plain, amp = tmp_path / "plain.tsv", tmp_path / "amp.tsv"
    assert main(certify_args(run_dir, plain, "--max", "4")) == 0
    assert main(certify_args(run_dir, amp, "--max", "4", "--amp", "bf16")) == 0
    assert read_sidecar(amp)["config"]["amp"] == "bf16" and "amp" not in read_sidecar(plain)["config"]
    assert main(certify_args(run_dir, amp, "--max", "4")) == 2  # another classifier: not the same file
    a, b = read_results(plain), read_results(amp)
    assert sum(x["predict"] == y["predict"] for x, y in zip(a, b)) >= 3  # bf16 rounding, same model
    target, _ = load_target(run_dir, "cpu", amp="bf16")  # what `ucan attack` rebuilds from the sidecar
    assert isinstance(target.smooth.model, Autocast)


def test_the_seed_changes_the_noise_of_every_image():
    import torch
    from ucan_smoothing.core.streams import image_generator

    cpu = torch.device("cpu")

    def noise(seed, idx):
        return torch.randn(4, generator=image_generator(seed, idx, cpu))

    assert not torch.equal(noise(0, 5), noise(7, 5))  # a 64-bit seed lost its high half on the CPU
    assert not torch.equal(noise(0, 5), noise(0, 6))
    assert torch.equal(noise(3, 5), noise(3, 5))
    assert torch.equal(noise(0, 5), torch.randn(4, generator=torch.Generator().manual_seed(5)))  # seed 0: as before


def test_a_larger_max_extends_a_file(run_dir, tmp_path):
    reference, out = tmp_path / "all.tsv", tmp_path / "grown.tsv"
    assert main(certify_args(run_dir, reference)) == 0
    assert main(certify_args(run_dir, out, "--max", "3")) == 0
    assert len(read_results(out)) == 3
    assert main(certify_args(run_dir, out)) == 0  # --max 8 again: five more rows, same as one run
    assert without_time(read_results(out)) == without_time(read_results(reference))


def test_sequential_mode_writes_its_decision(run_dir, tmp_path):
    out = tmp_path / "seq.tsv"
    assert main(certify_args(run_dir, out, "--radius", "0.25", "--n", "2000")) == 0
    rows = read_results(out)
    assert len(rows) == 8
    for row in rows:
        assert row["mode"] == "sequential-cp" and row["decided_radius"] == 0.25
        assert row["samples_used"] <= 32 + 2000
        # the decision, and the certificate built from the stopping bound, agree
        assert row["certified"] == (row["radius_l2"] >= 0.25)
        if row["certified"]:
            assert row["predict"] != -1
    assert any(row["samples_used"] < 32 + 2000 for row in rows), "no image stopped early"
    # scripts/compare_sequential.py sets the decisions beside a fixed-n run of the same images
    fixed = tmp_path / "fixed.tsv"
    assert main(certify_args(run_dir, fixed, "--n", "2000")) == 0
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_sequential.py"
    report = subprocess.run([sys.executable, str(script), str(out), str(fixed)], check=True, capture_output=True,
                            text=True).stdout
    fixed_rows = read_results(fixed)
    accuracy = sum(r["correct"] and r["radius_l2"] >= 0.25 for r in fixed_rows) / len(fixed_rows)
    mean_calls = sum(row["samples_used"] for row in rows) / len(rows)
    assert "8 common images; radius 0.25 in l2" in report
    assert f"| {100 * accuracy:.1f}% |" in report and f"mean {mean_calls:,.0f}" in report
    # a grid pass as the reference: its own calls per image, and the calls of a fixed n not run
    grid = tmp_path / "grid.tsv"
    assert main(certify_args(run_dir, grid, "--radii", "0", "0.25", "--norm", "l2", "--n", "2000")) == 0
    report = subprocess.run([sys.executable, str(script), str(out), str(grid), "--fixed-n", "100000"], check=True,
                            capture_output=True, text=True).stdout
    grid_rows = read_results(grid)
    grid_mean = sum(row["samples_used"] for row in grid_rows) / len(grid_rows)
    grid_accuracy = sum(r["correct"] and r["radius_l2"] >= 0.25 for r in grid_rows) / len(grid_rows)
    grid_line = next(line for line in report.splitlines() if "grid.tsv" in line)
    assert f"mean {grid_mean:,.0f}" in grid_line and f"({grid_mean / mean_calls:.1f}x" in grid_line
    assert f"| {100 * grid_accuracy:.1f}% |" in grid_line
    assert f"| 100,032 ({100_032 / mean_calls:.1f}x the first file's mean) | - | - |" in report
    other = tmp_path / "other_alpha.tsv"
    assert main(certify_args(run_dir, other, "--n", "2000", "--alpha", "0.01")) == 0
    refused = subprocess.run([sys.executable, str(script), str(out), str(other)], capture_output=True, text=True)
    assert refused.returncode != 0 and "differ in alpha" in refused.stderr


# Each bad command is refused with one line and exit status 2 before anything is written (no
# progress bar either: these run without --no-progress), and the corrected command then works
# on the same --out (before, a header-only file was left behind and the fix was refused).
REFUSED = [
    (["--alpha", "0"], [], "alpha must lie strictly between 0 and 1"),
    (["--alpha", "1.5"], [], "alpha must lie strictly between 0 and 1"),
    (["--n", "5"], [], "n=5 is too small to certify anything"),
    (["--n", "0"], [], "--n must be >= 1"),
    (["--n0", "0"], [], "--n0 must be >= 1"),
    (["--batch-size", "0"], [], "--batch-size must be >= 1"),
    (["--skip", "0"], [], "--skip must be >= 1"),
    (["--max", "0"], [], "--max must be >= 1"),
    (["--norm", "l2"], [], "--norm only applies with --radius"),
    (["--radius", "0.25", "--norm", "l3"], ["--radius", "0.25", "--norm", "l2"], "unknown norm 'l3'"),
    (["--radius", "-1"], ["--radius", "0.25"], "radius must be finite and > 0"),
    (["--radius", "inf"], ["--radius", "0.25"], "radius must be finite and > 0"),
    # Gaussian 0.25 reaches at most about 2 in l2, and 2 / sqrt(784) in linf
    (["--radius", "5", "--norm", "l2"], ["--radius", "0.25", "--norm", "l2"], "radius 5.0 in l2 cannot be certified"),
    (["--radius", "0.5", "--norm", "linf"], ["--radius", "0.01", "--norm", "linf"],
     "radius 0.5 in linf cannot be certified"),
    # reachable, but not with 100 samples
    (["--radius", "0.5"], ["--radius", "0.5", "--n", "1000"], "--n=100 is too small to certify radius 0.5"),
    (["--radius", "0.5", "--method", "betting"], ["--radius", "0.5", "--method", "betting", "--n", "1000"],
     "--n=100 is too small to certify radius 0.5"),
]


def assert_refused_before_writing(capsys, args, folder, message):
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucan certify: error: ") and message in lines[0], lines
    assert not folder.exists(), f"refused, yet {sorted(p.name for p in folder.iterdir())} written"


@pytest.mark.parametrize("bad, good, message", REFUSED, ids=[" ".join(bad) for bad, _, _ in REFUSED])
def test_bad_options_are_refused_before_anything_is_written(run_dir, tmp_path, capsys, bad, good, message):
    folder = tmp_path / "results"
    out = folder / "r.tsv"
    small = ("--max", "1", "--n", "100")
    command = [arg for arg in certify_args(run_dir, out, *small) if arg != "--no-progress"]
    assert_refused_before_writing(capsys, [*command, *bad], folder, message)
    assert main(certify_args(run_dir, out, *small, *good)) == 0
    assert len(read_results(out)) == 1 and read_sidecar(out)["config"]["alpha"] == 0.001


@pytest.mark.parametrize("images, message", [
    ([], "the test split has no images to certify"),
    ([(torch.zeros(1, 14, 14), 3)], "image 0 of the test split has shape (1, 14, 14) but the model takes (1, 28, 28)"),
])
def test_a_split_without_images_of_the_model_shape_is_refused(run_dir, tmp_path, capsys, monkeypatch, images,
                                                               message):
    import ucan_smoothing.commands.certify as certify

    folder = tmp_path / "results"
    out = folder / "r.tsv"
    with monkeypatch.context() as patched:
        patched.setattr(certify, "load_dataset", lambda *args: images)
        assert_refused_before_writing(capsys, certify_args(run_dir, out), folder, message)
    assert main(certify_args(run_dir, out, "--max", "1", "--n", "100")) == 0


def test_two_processes_merge_into_the_single_process_file(run_dir, tmp_path):
    single = tmp_path / "single.tsv"
    assert main(certify_args(run_dir, single)) == 0
    merged = tmp_path / "merged.tsv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               # `--` stops torchrun from reading our options (`--n` is a prefix of its `--nnodes`)
               "-m", "--", "ucan_smoothing.cli", *certify_args(run_dir, merged)]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=180)
    assert without_time(read_results(merged)) == without_time(read_results(single))
