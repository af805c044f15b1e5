"""Two writers on one new result file, started at the same moment: exactly one wins, the
other gets one clear line, and every row the winner reported written is in the file.
Atomic writes use unique temporary names and leave none behind when they fail."""

import os
import subprocess
import sys
import textwrap

import pytest

from ucan_smoothing.fileio import atomic_open
from ucan_smoothing.results import atomic_write, read_results, read_sidecar

# A worker waits on stdin, so the test can start two of them on the same path within
# microseconds: ``go PATH`` opens a writer (and appends three rows if it won), ``close``
# closes it. The winner holds the file open until both have answered.
WORKER = textwrap.dedent(
    """
    import sys
    import ucan_smoothing.results as results  # no torch: fast to start

    worker = int(sys.argv[1])
    writer = None
    for command in sys.stdin:
        try:
            if command.startswith("go "):
                try:
                    writer = results.ResultWriter(command[3:].strip(), {"n": 1000, "seed": 3})
                except results.ResultFileError as error:
                    print("lost", error, flush=True)
                    continue
                written = []
                for idx in range(10 * worker, 10 * worker + 3):
                    row = {name: 0 for name in results.RESULT_SCHEMA.names}
                    row.update(idx=idx, noise="gaussian:0.5", npg="none", is_certificate=True)
                    writer.write(row)
                    written.append(str(idx))
                print("won", " ".join(written), flush=True)
            elif command == "close\\n":
                if writer is not None:
                    writer.close()
                    writer = None
                print("closed", flush=True)
        except Exception as error:
            print("error", repr(error), flush=True)
    """
)

ROUNDS = 20


def test_two_writers_started_together_exactly_one_wins_and_keeps_its_rows(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen([sys.executable, str(script), str(w)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for w in range(2)
    ]
    try:
        for round_ in range(ROUNDS):
            folder = tmp_path / f"round{round_}"
            folder.mkdir()
            path = folder / "out.tsv"
            for worker in workers:
                worker.stdin.write(f"go {path}\n")
            for worker in workers:  # the two flushes are what start them, back to back
                worker.stdin.flush()
            answers = [worker.stdout.readline().rstrip("\n").split(" ", 1) for worker in workers]
            assert sorted(answer[0] for answer in answers) == ["lost", "won"], f"round {round_}: {answers}"
            (_, written), = [answer for answer in answers if answer[0] == "won"]
            (_, message), = [answer for answer in answers if answer[0] == "lost"]
            assert message == f"another process is writing {path}"
            for worker in workers:
                worker.stdin.write("close\n")
                worker.stdin.flush()
            assert [worker.stdout.readline() for worker in workers] == ["closed\n", "closed\n"]
            assert [row["idx"] for row in read_results(path)] == [int(idx) for idx in written.split()]
            assert len(read_sidecar(path)["runs"]) == 1  # the loser did not touch the file
            assert sorted(os.listdir(folder)) == ["out.tsv", "out.tsv.json"]  # no temporary or lock file
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait(timeout=60)


def test_two_writes_of_one_file_at_once_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    # What two racing processes did: a second write of the same file lands between the first's
    # temporary write and its rename (with one fixed name: "No such file ... .tsv.json.tmp").
    path = tmp_path / "out.tsv.json"
    real_replace = os.replace

    def replace_after_another_write(source, target):
        monkeypatch.setattr(os, "replace", real_replace)
        atomic_write(path, "second")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_another_write)
    atomic_write(path, "first")
    assert path.read_text() == "first"  # the last to finish wins, and neither failed
    assert os.listdir(tmp_path) == ["out.tsv.json"]


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "taken", "text")  # the final rename fails
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(tmp_path / "out.tsv", "w") as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["taken"]
