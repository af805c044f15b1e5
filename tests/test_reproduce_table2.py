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


def _finished_grid_file(path, grid_radii, samples):
    """A finished grid-mode file (one row per image, ``grid_radii[i]`` its certified grid radius;
    -1 abstains) and an attack summary beside it, as the script would leave them."""
    from ucan_smoothing.results import GRID_COLUMNS, RESULT_SCHEMA, ResultWriter

    config = {"checkpoint": str(path.parent), "noise": {"family": "gaussian", "scale": 0.5}, "n0": 100,
              "n": 100_000, "alpha": 0.001, "seed": 0, "out": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with ResultWriter(path, config, schema=RESULT_SCHEMA.with_columns(*GRID_COLUMNS)) as writer:
        for idx, radius in enumerate(grid_radii):
            abstain = radius < 0
            writer.write({
                "idx": 20 * idx, "label": 1, "predict": -1 if abstain else 1, "radius": max(radius, 0.0),
                "correct": int(not abstain), "time": 0.1, "radius_l1": 0.0, "radius_l2": max(radius, 0.0),
                "radius_linf": 0.0, "alm": 0.0, "p_lower": 0.9, "n0": 100, "n": samples, "alpha": 0.001,
                "noise": "gaussian:0.5", "npg": "none", "is_certificate": True, "mode": "grid-cp",
                "grid_radius": max(radius, 0.0), "samples_used": samples})
    path.with_suffix(".attack.tsv.summary.json").write_text('{"violations": 0, "attacked": 3}')


def test_report_from_finished_files_has_the_rows_the_pairing_and_the_figure(tmp_path):
    results = tmp_path / "g0.5" / "results"
    # four images: certified up to 1.0, 0.25, 0 and one abstention
    _finished_grid_file(results / "isotropic.grid.tsv", [1.0, 0.25, 0.0, -1], 1000)
    _finished_grid_file(results / "pattern_p2.grid.tsv", [0.5, 0.5, 0.5, 0.5], 3000)
    table2.main(["--out", str(tmp_path), "--report-only", "--levels", "0.5", "--images", "4",
                 "--fixed-images", "2", "--methods", "isotropic", "pattern_p2"])
    report = (tmp_path / "table2.md").read_text()
    cells = {}
    for line in report.splitlines():  # the certified-accuracy rows come before the paired ones
        if line.startswith(("| isotropic", "| pattern")):
            cells.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:-1]])
    # guarantee, images, mean samples, then radii 0, 0.25, 0.5, 0.75, 1, 1.25 ..., then the attack
    assert cells["isotropic"][:9] == ["proven", "4", "1,000", "75.0", "50.0", "25.0", "25.0", "25.0", "0.0"]
    assert cells["isotropic"][-1] == "0 of 3"
    assert cells["pattern"][:8] == ["proven", "4", "3,000", "100.0", "100.0", "100.0", "0.0", "0.0"]
    # paired at 0.25 / 0.5 / 0.75 / 1 / 1.5 / 2: pattern alone certifies images 40, 60 at 0.25 and 20, 40, 60
    # at 0.5; isotropic alone image 0 at 0.75 and 1
    assert ("| pattern | 2 / 0 (p 0.5) | 3 / 0 (p 0.25) | 0 / 1 (p 1) | 0 / 1 (p 1) | 0 / 0 (p 1) | 0 / 0 (p 1) |"
            in report)
    assert (tmp_path / "table2.png").stat().st_size > 1000


def test_a_method_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """The legend sits in the first panel only: a method missing from one panel must not shift the
    colours of the methods after it in that panel."""
    import matplotlib.pyplot as plt

    from reproduce_mnist import curve_panels

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    radii = [0.0, 0.5]
    curve_panels({("all", "l2 radius"): {m: (radii, [1.0, 0.5]) for m in ("isotropic", "noisy_shift", "lipschitz_shift")},
                  ("one missing", "l2 radius"): {m: (radii, [1.0, 0.5]) for m in ("isotropic", "lipschitz_shift")}},
                 tmp_path / "f.png")
    first, second = ({line.get_label(): line.get_color() for line in ax.get_lines()} for ax in figures[0].axes[:2])
    assert second["lipschitz_shift"] == first["lipschitz_shift"] != first["noisy_shift"]
    assert [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()] == [
        "isotropic", "noisy_shift", "lipschitz_shift"]
