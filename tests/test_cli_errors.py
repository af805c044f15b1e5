"""One line and exit status 2 for a user's mistake or an environment the work cannot run in, finished
work untouched; a bug keeps its traceback (issue 12, items 6 and 10)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ucan_smoothing import cli
from ucan_smoothing.training import train_classifier

TINY = dict(device="cpu", progress=False, threads=1, batch_size=32, epochs=1)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A few random MNIST-shaped images as IDX files: enough to run the code, not to learn."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 64), ("t10k", 32)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count))
    return str(root)


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    return train_classifier(data_root=data_root, out=str(tmp_path_factory.mktemp("runs") / "run"), **TINY)


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of a finished one-epoch run, to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ucan {command}: error: "), err
    return lines[0]


def _resume(run: Path) -> int:
    return cli.main(["train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"])


# --------------------------------------------------------------------------- damaged run files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


LAST_DAMAGES = {
    "empty": lambda run: (run / "last.pt").write_bytes(b""),
    "truncated": lambda run: _truncate(run / "last.pt"),
    "text": lambda run: (run / "last.pt").write_text("not a checkpoint\n"),
    "a list": lambda run: torch.save([1, 2], run / "last.pt"),
    "a dict without extra": lambda run: torch.save({"state_dict": {}, "model_name": "mnist_cnn"}, run / "last.pt"),
    "final.pt (no training state)": lambda run: shutil.copyfile(run / "final.pt", run / "last.pt"),
}


@pytest.mark.parametrize("damage", sorted(LAST_DAMAGES))
def test_resume_from_a_damaged_last_pt_is_one_line(damage, run, capsys):
    LAST_DAMAGES[damage](run)
    before = _files(run)
    assert _resume(run) == 2
    line = _one_error_line(capsys)
    assert f"cannot resume {str(run)!r}: last.pt is truncated or not a checkpoint of `ucan train`" in line
    assert _files(run) == before


CONFIG_DAMAGES = {
    "binary": b"\x00\xff\xfe garbage",
    "truncated JSON": b'{"config": {"target": "classifier", ',
    "a JSON list": b"[1, 2]\n",
    "JSON without config": b'{"command": "ucan train"}\n',
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGES))
def test_resume_with_a_damaged_config_json_is_one_line(damage, run, capsys):
    (run / "config.json").write_bytes(CONFIG_DAMAGES[damage])
    before = _files(run)
    assert _resume(run) == 2
    line = _one_error_line(capsys)
    assert f"{str(run / 'config.json')!r} is damaged or not the record of a `ucan train` run" in line
    assert _files(run) == before


# --------------------------------------------------------------------------- places that cannot be written


@pytest.fixture
def full_disk(monkeypatch):
    """Every file write fails as on a full disk (at the fsync that makes it durable)."""

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


def test_a_full_disk_is_one_line_and_the_run_is_untouched(run, full_disk, capsys):
    before = _files(run)
    assert _resume(run) == 2
    line = _one_error_line(capsys)
    assert line.endswith(f"cannot write {str(run / 'config.json')!r}: No space left on device")
    assert _files(run) == before  # no temporary file left either


def test_a_full_disk_on_a_new_run_is_one_line(data_root, tmp_path, full_disk, capsys):
    argv = ["train", "classifier", "--data-root", data_root, "--epochs", "1", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(tmp_path / "new")]
    assert cli.main(argv) == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert list((tmp_path / "new").iterdir()) == []


def test_train_out_under_a_regular_file_is_one_line(data_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    common = ["train", "classifier", "--data-root", data_root, "--epochs", "1", "--device", "cpu", "--threads", "1",
              "--no-progress", "--out"]
    assert cli.main(common + [str(blocker / "run")]) == 2
    line = _one_error_line(capsys)
    assert f"cannot write {str(blocker / 'run')!r}: Not a directory (a part of that path is a file" in line
    assert cli.main(common + [str(blocker)]) == 2  # --out is itself a file
    assert f"cannot write {str(blocker)!r}: File exists" in _one_error_line(capsys)
    assert blocker.read_text() == "not a folder\n"


def test_certify_out_under_a_regular_file_is_one_line(run, data_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    argv = ["certify", str(run), "--data-root", data_root, "--out", str(blocker / "r.tsv"), "--n0", "5", "--n", "10",
            "--max", "1", "--no-progress"]
    assert cli.main(argv) == 2
    assert "(a part of that path is a file, not a folder)" in _one_error_line(capsys, "certify")
    assert blocker.read_text() == "not a folder\n"


# --------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 400000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB."),
], ids=["cpu", "gpu"])
def test_a_batch_too_large_for_memory_says_what_to_lower(error, run, monkeypatch, capsys):
    def out_of_memory(self, epoch):
        raise error

    monkeypatch.setattr("ucan_smoothing.training.loop._Run._train_epoch", out_of_memory)
    before = _files(run)
    assert _resume(run) == 2
    line = _one_error_line(capsys)
    assert "does not fit in" in line and line.endswith("memory: lower --batch-size")
    assert {k: v for k, v in _files(run).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}  # the resume note in config.json aside


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                   OSError(errno.ECONNRESET, "Connection reset by peer"), KeyError("extra")])
def test_a_bug_keeps_its_traceback(error, run, monkeypatch):
    def bug(self, epoch):
        raise error

    monkeypatch.setattr("ucan_smoothing.training.loop._Run._train_epoch", bug)
    with pytest.raises(type(error)):
        _resume(run)


# --------------------------------------------------------------------------- --threads


def test_threads_option_of_a_compute_command(monkeypatch, capsys):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    seen = []
    monkeypatch.setattr("ucan_smoothing.commands.certify.run", lambda args: seen.append(torch.get_num_threads()))
    assert cli.main(["certify", "RUN", "--out", "r.tsv", "--threads", str(wanted)]) == 0
    assert cli.main(["certify", "RUN", "--out", "r.tsv"]) == 0  # not asked: left alone
    assert seen == [wanted, before]
    assert torch.get_num_threads() == before  # main() leaves the process as it found it
    assert cli.main(["certify", "RUN", "--out", "r.tsv", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in _one_error_line(capsys, "certify")
    assert seen == [wanted, before]


# --------------------------------------------------------------------------- help text


def test_help_shows_defaults_of_values_not_of_plain_flags(capsys):
    """``--no-progress`` once read "(default: True)": the dest's default, the opposite of what the flag does."""
    with pytest.raises(SystemExit):
        cli.main(["certify", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # past the usage lines
    assert "--no-progress no progress bar --" in text  # no default after a plain flag
    assert "(default: True)" in text.split("--no-channels-last", 1)[1].split("--amp", 1)[0]  # on/off pair keeps it
    assert "image i uses (seed, i) (default: 0)" in text
