"""Result files: round trip, resume after a simulated and a real kill (SIGKILL),
refusal of a changed config, shard split and merge, Cohen-format files and
errors that name the line."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from ucan_smoothing import Gaussian, Smooth
from ucan_smoothing.results import (
    RESULT_SCHEMA,
    SEQUENTIAL_COLUMNS,
    ResultFileError,
    ResultWriter,
    describe_noise,
    merge_shards,
    read_results,
    read_sidecar,
    row_from_certificate,
    shard_path,
    split_indices,
)

CONFIG = {"checkpoint": "runs/mnist", "noise": {"family": "gaussian", "scale": 0.25}, "n0": 100, "n": 1000,
          "alpha": 0.001, "seed": 0, "progress": True, "out": "a.tsv"}


def fake_row(idx, **changes):
    row = {
        "idx": idx, "label": idx % 10, "predict": idx % 10 if idx % 3 else -1, "radius": 0.1 * idx,
        "correct": int(idx % 3 != 0), "time": 0.5, "radius_l1": 0.1 * idx, "radius_l2": 0.1 * idx,
        "radius_linf": 0.01 * idx, "alm": 0.2 * idx, "p_lower": 0.9, "n0": 100, "n": 1000, "alpha": 0.001,
        "noise": "gaussian:0.25", "npg": "pattern_fixed:p2", "is_certificate": True,
    }
    row.update(changes)
    return row


def write_rows(path, indices, config=CONFIG, **options):
    with ResultWriter(path, config, **options) as writer:
        for idx in indices:
            writer.write(fake_row(idx))


def test_round_trip_keeps_every_value_and_type(tmp_path):
    path = tmp_path / "out.tsv"
    rows = [fake_row(i, p_lower=1 / 3 + i, is_certificate=bool(i % 2)) for i in range(5)]
    with ResultWriter(path, CONFIG) as writer:
        assert writer.done_indices() == frozenset()
        for row in rows:
            writer.write(row)
    assert read_results(path) == rows
    header = path.read_text().splitlines()[0].split("\t")
    assert header == list(RESULT_SCHEMA.names)
    assert header[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    sidecar = read_sidecar(path)
    assert sidecar["config"] == CONFIG
    assert {"python", "torch", "numpy", "scipy", "ucan_smoothing", "platform", "command"} <= set(sidecar["runs"][0])
    assert sidecar["runs"][0]["torch"] is not None


def test_row_from_certificate_uses_the_certificate():
    import torch

    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 4) * 10)
        model.bias.zero_()
    smooth = Smooth(model, 3, Gaussian(0.25), input_shape=(4,))
    certificate = smooth.certify(torch.tensor([1.0, 0.0, 0.0, 0.0]), n0=50, n=500, alpha=0.01, generator=0)
    noise = describe_noise(Gaussian(0.25))
    row = row_from_certificate(7, 0, certificate, 1.25, noise, "none")
    assert noise == "gaussian:0.25"
    assert row["predict"] == certificate.prediction == 0 and row["correct"] == 1
    assert row["radius"] == certificate.radius() == row["radius_l2"]
    assert row["radius_linf"] == certificate.radius("linf") and row["alm"] == certificate.alm
    assert (row["p_lower"], row["n0"], row["n"], row["alpha"]) == (certificate.p_lower, 50, 500, 0.01)
    assert row["is_certificate"] is True and set(row) == set(RESULT_SCHEMA.names)

    abstained = SimpleNamespace(
        prediction=-1, abstained=True, radius=lambda norm=None: 0.0, radii=lambda: {"l1": 0.0, "l2": 0.0, "linf": 0.0},
        alm=0.0, p_lower=0.4, n0=50, n=500, alpha=0.01, is_certificate=False,
    )
    row = row_from_certificate(8, 2, abstained, 0.1, noise, "input_dependent")
    assert row["predict"] == -1 and row["correct"] == 0 and row["is_certificate"] is False


def test_resume_after_a_half_written_line(tmp_path):
    path = tmp_path / "out.tsv"
    write_rows(path, range(3))
    # What a kill in the middle of a write leaves: a line without its newline.
    with open(path, "a") as file:
        file.write(RESULT_SCHEMA.format_row(fake_row(3))[:25])
    with pytest.raises(ResultFileError, match="line 5.*half-written"):
        read_results(path)
    with ResultWriter(path, {**CONFIG, "progress": False, "out": "elsewhere.tsv"}) as writer:
        assert writer.done_indices() == {0, 1, 2}
        for idx in range(6):
            if idx not in writer.done_indices():
                writer.write(fake_row(idx))
        with pytest.raises(ResultFileError, match="already has a row for image 4"):
            writer.write(fake_row(4))
    assert [row["idx"] for row in read_results(path)] == list(range(6))
    assert path.read_text().endswith("\n") and len(read_sidecar(path)["runs"]) == 2


def test_rows_written_as_images_finish_are_sorted_at_the_end(tmp_path):
    path = tmp_path / "out.tsv"
    with ResultWriter(path, CONFIG) as writer:
        for idx in (7, 2, 9):
            writer.write(fake_row(idx))
    # an interrupted run keeps every finished row, in the order they finished
    assert [row["idx"] for row in read_results(path)] == [7, 2, 9]
    with ResultWriter(path, CONFIG) as writer:
        for idx in (4, 0):
            writer.write(fake_row(idx))
        writer.sort_rows()
    assert read_results(path) == [fake_row(i) for i in (0, 2, 4, 7, 9)]
    with ResultWriter(path, CONFIG) as writer:  # the lock was released, the file resumes as before
        assert writer.done_indices() == {0, 2, 4, 7, 9}


def test_changed_config_is_refused_with_the_differing_keys(tmp_path):
    path = tmp_path / "out.tsv"
    write_rows(path, range(2))
    changed = {**CONFIG, "n": 2000, "noise": {"family": "gaussian", "scale": 0.5}}
    with pytest.raises(ResultFileError, match=r"differing keys: n, noise\.scale"):
        ResultWriter(path, changed)
    with pytest.raises(ResultFileError, match="columns"):
        ResultWriter(path, CONFIG, schema=RESULT_SCHEMA.with_columns(*SEQUENTIAL_COLUMNS))
    assert [row["idx"] for row in read_results(path)] == [0, 1]


def test_a_second_writer_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "out.tsv"
    with ResultWriter(path, CONFIG):
        with pytest.raises(ResultFileError, match="another process"):
            ResultWriter(path, CONFIG)


def test_extra_columns_for_a_later_mode(tmp_path):
    path = tmp_path / "out.tsv"
    schema = RESULT_SCHEMA.with_columns(*SEQUENTIAL_COLUMNS)
    row = fake_row(0, mode="sequential", decided_radius=0.5, certified=False, samples_used=1234)
    with ResultWriter(path, CONFIG, schema=schema) as writer:
        with pytest.raises(ValueError, match="missing"):
            writer.write(fake_row(1))
        writer.write(row)
    assert read_results(path) == [row]


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import ucan_smoothing.results as results  # imports no torch: fast to start
    config = {"n": 1000, "seed": 3}
    with results.ResultWriter(sys.argv[1], config) as writer:
        for idx in range(int(sys.argv[2])):
            if idx in writer.done_indices():
                continue
            row = {name: 0 for name in results.RESULT_SCHEMA.names}
            row.update(idx=idx, noise="gaussian:0.5", npg="x" * 3000, is_certificate=True, p_lower=idx / 7)
            writer.write(row)
            time.sleep(0.002)
    """
)


def test_real_kill_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    path = tmp_path / "out.tsv"
    total = 300
    command = [sys.executable, str(script), str(path), str(total)]
    rng = random.Random(0)
    kills = 0
    for _ in range(6):
        process = subprocess.Popen(command, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.03, 0.25))
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        kills += process.returncode == -signal.SIGKILL
        assert process.returncode in (0, -signal.SIGKILL), stderr.decode()
    finished = subprocess.run(command, capture_output=True, timeout=60)
    assert finished.returncode == 0, finished.stderr.decode()
    assert kills >= 3
    rows = read_results(path)
    assert sorted(row["idx"] for row in rows) == list(range(total))
    assert all(row["p_lower"] == row["idx"] / 7 and row["npg"] == "x" * 3000 for row in rows)
    assert read_sidecar(path)["config"] == {"n": 1000, "seed": 3}


def test_split_indices_is_a_deterministic_partition():
    indices = list(range(0, 50, 5))
    parts = [split_indices(indices, rank, 3) for rank in range(3)]
    assert parts == [[0, 15, 30, 45], [5, 20, 35], [10, 25, 40]]
    assert sorted(sum(parts, [])) == indices
    with pytest.raises(ValueError):
        split_indices(indices, 3, 3)


def write_parts(path, indices, world_size):
    for rank in range(world_size):
        part = shard_path(path, rank, world_size)
        # Each rank's own output path and progress setting must not matter.
        write_rows(part, reversed(split_indices(indices, rank, world_size)), {**CONFIG, "out": str(part), "progress": rank})


def test_merge_shards_in_index_order_then_removes_the_parts(tmp_path):
    path = tmp_path / "out.tsv"
    indices = list(range(11))
    write_parts(path, indices, 3)
    assert shard_path(path, 2, 3).name == "out.tsv.part2of3"
    parts_and_sidecars = sorted(os.listdir(tmp_path))
    with pytest.raises(ResultFileError, match="11 images have no row"):
        merge_shards(path, 3, expected_indices=range(22))
    assert sorted(os.listdir(tmp_path)) == parts_and_sidecars  # a failed merge keeps the parts
    merge_shards(path, 3, expected_indices=indices)
    assert [row["idx"] for row in read_results(path)] == indices
    assert read_results(path)[4] == fake_row(4)
    assert len(read_sidecar(path)["parts"]) == 3
    # Parts, their sidecars and lock files are gone, and no temporary file is left.
    assert sorted(os.listdir(tmp_path)) == ["out.tsv", "out.tsv.json"]


def test_a_later_merge_keeps_the_rows_of_the_main_file(tmp_path):
    path = tmp_path / "out.tsv"
    write_parts(path, range(6), 2)
    merge_shards(path, 2)
    first = path.read_text().splitlines()
    # A rerun (a smaller --max, then a larger one): the rows already merged stay as they are.
    write_parts(path, range(3), 2)
    merge_shards(path, 2, expected_indices=range(3))
    assert path.read_text().splitlines() == first
    write_parts(path, range(9), 2)
    merge_shards(path, 2, expected_indices=range(9))
    assert path.read_text().splitlines()[:7] == first
    assert [row["idx"] for row in read_results(path)] == list(range(9))
    assert len(read_sidecar(path)["parts"]) == 6


def test_merge_is_refused_while_a_writer_holds_a_part_or_the_main_file(tmp_path):
    path = tmp_path / "out.tsv"
    write_parts(path, range(6), 2)
    parts_and_sidecars = sorted(os.listdir(tmp_path))
    with ResultWriter(shard_path(path, 1, 2), CONFIG):
        with pytest.raises(ResultFileError, match="another process is writing .*out.tsv.part1of2"):
            merge_shards(path, 2)
    with ResultWriter(path, CONFIG) as writer:
        writer.write(fake_row(100))
        with pytest.raises(ResultFileError, match="another process is writing .*out.tsv$"):
            merge_shards(path, 2)
        writer.write(fake_row(101))
    assert [row["idx"] for row in read_results(path)] == [100, 101]  # the merge did not replace it under us
    assert sorted(os.listdir(tmp_path)) == sorted(parts_and_sidecars + ["out.tsv", "out.tsv.json"])
    merge_shards(path, 2)
    assert [row["idx"] for row in read_results(path)] == [0, 1, 2, 3, 4, 5, 100, 101]


def test_merge_refuses_duplicates_missing_parts_and_other_configs(tmp_path):
    path = tmp_path / "out.tsv"
    write_rows(shard_path(path, 0, 2), [0, 2])
    with pytest.raises(ResultFileError, match="missing parts out.tsv.part1of2"):
        merge_shards(path, 2)
    write_rows(shard_path(path, 1, 2), [1, 2])
    with pytest.raises(ResultFileError, match="image 2 is in both"):
        merge_shards(path, 2)
    other = tmp_path / "other.tsv"
    write_rows(shard_path(other, 0, 2), [0])
    write_rows(shard_path(other, 1, 2), [1], {**CONFIG, "seed": 1})
    with pytest.raises(ResultFileError, match="different configs: seed"):
        merge_shards(other, 2)


def test_reads_a_cohen_format_file(tmp_path):
    path = tmp_path / "cohen.tsv"
    path.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        "0\t3\t3\t0.512\t1\t0:00:07.250000\n"
        "20\t8\t-1\t0.0\t0\t1 day, 1:00:00\n"
    )
    rows = read_results(path)
    assert rows == [
        {"idx": 0, "label": 3, "predict": 3, "radius": 0.512, "correct": 1, "time": 7.25},
        {"idx": 20, "label": 8, "predict": -1, "radius": 0.0, "correct": 0, "time": 90000.0},
    ]


def test_unknown_columns_get_the_narrowest_kind(tmp_path):
    path = tmp_path / "extra.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tk\tw\tflag\tname\n0\t1\t1\t0.5\t1\t2.0\t3\t1\ttrue\tabc\n"
                    "1\t1\t1\t0.5\t1\t2.0\t4\t1.5\tFalse\t12\n")
    rows = read_results(path)
    assert [(r["k"], r["w"], r["flag"], r["name"]) for r in rows] == [(3, 1.0, True, "abc"), (4, 1.5, False, "12")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("index\tlabel\n0\t1\n", "line 1: expected a header"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t2.0\n1\t1\t1\t0.5\t1\n", "line 3: 5 fields"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t2.0\n1\t1\tcat\t0.5\t1\t2\n",
         "line 3, column predict: cannot read 'cat' as int"),
    ],
)
def test_malformed_files_name_the_path_and_line(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ResultFileError, match=message) as error:
        read_results(path)
    assert str(path) in str(error.value)


def test_missing_file_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(ResultFileError, match="cannot read result file"):
        read_results(tmp_path / "nope.tsv")
    foreign = tmp_path / "foreign.tsv"
    foreign.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    with pytest.raises(ResultFileError, match="no sidecar"):
        ResultWriter(foreign, CONFIG)
