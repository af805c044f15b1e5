"""scripts/reproduce_table2.py: ``--methods`` runs and reports the chosen methods only."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import reproduce_table2 as table2  # noqa: E402


def test_methods_choose_the_rows(tmp_path):
    table2.main(["--out", str(tmp_path), "--report-only", "--levels", "0.5",
                 "--methods", "isotropic", "input_dependent"])
    rows = [line for line in (tmp_path / "table2.md").read_text().splitlines() if line.startswith("| ")]
    methods = [row.split("|")[1].strip() for row in rows[1:]]
    assert methods == ["isotropic", "paper mode"]
    assert all("not run" in row for row in rows[1:])


def test_an_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        table2.parse_args(["--methods", "pattern"])
    assert stop.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
