"""`ucan analyze`: exact figures on small synthetic result files, the ALM and
non-certificate labelling, Cohen-format and sequential files, plots, errors."""

import csv

import matplotlib.pyplot as plt
import pytest
import torch

from ucan_smoothing import analysis as analyze
from ucan_smoothing.analysis import (
    ALM_NAME,
    NOT_CERTIFICATE,
    accuracy_key,
    acr_key,
    markdown_table,
    plot_certified_accuracy,
    plot_sigma_maps,
    summarize,
)
from ucan_smoothing.cli import main
from ucan_smoothing.results import RESULT_SCHEMA, SEQUENTIAL_COLUMNS, ResultFileError, ResultWriter

# (label, predict, l1, l2, linf, alm, time): radii chosen so every figure is known exactly
ROWS = [
    (1, 1, 0.6, 0.6, 0.02, 0.9, 1.0),   # correct, certified far
    (2, 2, 0.3, 0.3, 0.01, 0.4, 2.0),   # correct, certified near
    (1, 3, 0.8, 0.8, 0.03, 1.2, 3.0),   # wrong prediction: its radius must count as 0
    (4, -1, 0.0, 0.0, 0.0, 0.0, 4.0),   # abstained
    (5, 5, 0.1, 0.1, 0.004, 0.5, 5.0),  # correct, certified barely
]


def make_row(idx, label, predict, l1, l2, linf, alm, seconds, is_certificate=True):
    return {
        "idx": idx, "label": label, "predict": predict, "radius": l2, "correct": int(predict == label),
        "time": seconds, "radius_l1": l1, "radius_l2": l2, "radius_linf": linf, "alm": alm, "p_lower": 0.9,
        "n0": 100, "n": 1000, "alpha": 0.001, "noise": "gaussian:0.25", "npg": "universal",
        "is_certificate": is_certificate,
    }


def write_file(path, rows, schema=RESULT_SCHEMA):
    """``rows`` as a result file; keys the schema lacks are dropped (rows may carry optional columns)."""
    with ResultWriter(path, {"test": str(path)}, schema=schema) as writer:
        for row in rows:
            writer.write({name: row[name] for name in schema.names})
    return path


@pytest.fixture
def ucan_file(tmp_path):
    return write_file(tmp_path / "ucan.tsv", [make_row(i, *values) for i, values in enumerate(ROWS)])


@pytest.fixture
def paper_file(tmp_path):
    rows = [make_row(i, *values, is_certificate=False) for i, values in enumerate(ROWS)]
    return write_file(tmp_path / "paper.tsv", rows)


@pytest.fixture
def cohen_file(tmp_path):
    # Cohen et al.'s own format: six columns, time as str(timedelta)
    path = tmp_path / "cohen.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t3\t3\t0.7\t1\t0:00:01.500000\n"
                    "10\t8\t8\t0.2\t1\t0:00:02.500000\n"
                    "20\t0\t-1\t0.0\t0\t0:00:03.500000\n"
                    "30\t6\t2\t0.9\t0\t0:00:04.500000\n")
    return path


def test_exact_certified_accuracy_acr_abstention_time(ucan_file):
    (row,) = summarize([ucan_file])
    assert row["method"] == "ucan" and row["images"] == 5 and row["guarantee"] == "proven"
    expected_l2 = {0.0: 3 / 5, 0.25: 2 / 5, 0.5: 1 / 5, 0.75: 0.0, 1.0: 0.0}  # the wrong row's 0.8 never counts
    for r, value in expected_l2.items():
        assert row[accuracy_key("l2", r)] == pytest.approx(value)
        assert row[accuracy_key("l1", r)] == pytest.approx(value)
    assert row[accuracy_key("linf", 0.005)] == pytest.approx(2 / 5)
    assert row[accuracy_key("linf", 0.02)] == pytest.approx(1 / 5)
    assert row[accuracy_key("alm", 0.5)] == pytest.approx(2 / 5)  # 0.9 and 0.5, not the wrong row's 1.2
    assert row[acr_key("l2")] == pytest.approx((0.6 + 0.3 + 0.1) / 5)
    assert row[acr_key("linf")] == pytest.approx((0.02 + 0.01 + 0.004) / 5)
    assert row[acr_key("alm")] == pytest.approx((0.9 + 0.4 + 0.5) / 5)
    assert row["abstention rate"] == pytest.approx(1 / 5)
    assert row["time per image (s)"] == pytest.approx(3.0)
    assert row["samples per image"] == 1100
    assert row["noise"] == "gaussian:0.25" and row["npg"] == "universal"


def test_radii_can_be_chosen_per_norm_or_for_all(ucan_file):
    (row,) = summarize([ucan_file], radii={"l2": [0.3, 0.1]})
    assert row[accuracy_key("l2", 0.3)] == pytest.approx(2 / 5)  # radius >= r is inclusive
    assert accuracy_key("l2", 0.25) not in row
    assert accuracy_key("linf", 0.01) in row  # other norms keep their defaults
    (row,) = summarize([ucan_file], radii=[0.05])
    assert [key for key in row if ">=" in key] == [accuracy_key(n, 0.05) for n in ("l1", "l2", "linf", "alm")]
    with pytest.raises(ValueError, match="radii"):
        summarize([ucan_file], radii={"l2": [-1]})


def test_rows_work_like_files(ucan_file):
    rows = [make_row(i, *values) for i, values in enumerate(ROWS)]
    from_rows = summarize({"mine": rows})[0]
    from_file = summarize([ucan_file])[0]
    assert from_rows["method"] == "mine"
    assert {k: v for k, v in from_rows.items() if k not in ("method", "file")} == \
           {k: v for k, v in from_file.items() if k not in ("method", "file")}


def test_alm_is_never_headed_as_a_certified_radius(ucan_file, tmp_path):
    summary = summarize([ucan_file])
    table = markdown_table(summary)
    headers = [cell.strip() for line in table.splitlines() if line.startswith("| method")
               for cell in line.strip("|").split("|")]
    alm_headers = [h for h in headers if "ALM" in h]
    assert len(alm_headers) == 1 + len(analyze.DEFAULT_RADII["alm"])  # the mean and one per threshold
    assert all("not a certified radius" in h for h in alm_headers)
    assert all("ALM" not in h for h in headers if "certified accuracy" in h or h.startswith(("l1", "l2", "l_inf")))
    assert f"{ALM_NAME} >= 0.5" in headers
    path = analyze.write_csv(summary, tmp_path / "summary.csv")
    with open(path, newline="") as handle:
        csv_headers = next(csv.reader(handle))
    assert all("not a certified radius" in h for h in csv_headers if "ALM" in h.upper())


def test_non_certificate_methods_are_marked(ucan_file, paper_file):
    summary = summarize([ucan_file, paper_file], labels=["fixed", "input-dependent"])
    assert [row["guarantee"] for row in summary] == ["proven", NOT_CERTIFICATE]
    table = markdown_table(summary)
    marked = [line for line in table.splitlines() if line.startswith("| input-dependent")]
    assert len(marked) == 5 and all("NOT a certificate" in line for line in marked)  # every table
    assert not any("NOT a certificate" in line for line in table.splitlines() if line.startswith("| fixed"))


def test_a_mixed_file_is_refused(tmp_path):
    rows = [make_row(0, *ROWS[0]), make_row(1, *ROWS[1], is_certificate=False)]
    path = write_file(tmp_path / "mixed.tsv", rows)
    with pytest.raises(ResultFileError, match="mixes proven certificates with 1 rows that are NOT"):
        summarize([path])


def test_cohen_format_gives_its_native_radius_only(cohen_file):
    (row,) = summarize([cohen_file])
    assert row[accuracy_key("l2", 0.0)] == pytest.approx(2 / 4)
    assert row[accuracy_key("l2", 0.5)] == pytest.approx(1 / 4)  # the wrong row's 0.9 does not count
    assert row[acr_key("l2")] == pytest.approx((0.7 + 0.2) / 4)
    assert row[accuracy_key("l1", 0.0)] is None and row[acr_key("alm")] is None
    assert row["time per image (s)"] == pytest.approx(3.0) and row["samples per image"] is None
    assert row["abstention rate"] == pytest.approx(1 / 4)
    assert "Cohen format" in row["format"] and "n/a" in markdown_table([row])
    (row,) = summarize([cohen_file], cohen_norm="l1")
    assert row[acr_key("l1")] == pytest.approx((0.7 + 0.2) / 4) and row[acr_key("l2")] is None


def test_sequential_files_report_samples_used(tmp_path):
    rows = [{**make_row(i, *values), "mode": "sequential-cp", "decided_radius": 0.25, "certified": values[3] >= 0.25,
             "samples_used": samples}
            for i, (values, samples) in enumerate(zip(ROWS, (200, 400, 600, 800, 1000)))]
    path = write_file(tmp_path / "seq.tsv", rows, RESULT_SCHEMA.with_columns(*SEQUENTIAL_COLUMNS))
    (row,) = summarize([path])
    assert row["samples per image"] == pytest.approx(600)
    assert row["format"].startswith("sequential") and "0.25" in row["format"]
    assert "understates" in markdown_table([row])


def test_cli_writes_tables_and_a_readable_plot(ucan_file, paper_file, cohen_file, tmp_path, capsys):
    out = tmp_path / "report"
    status = main(["analyze", str(ucan_file), str(paper_file), str(cohen_file),
                   "--label", "fixed", "--label", "paper", "--label", "cohen",
                   "--radii-linf", "0", "0.01", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| fixed | proven |" in printed and "l_inf >= 0.01" in printed and "l_inf >= 0.005" not in printed
    assert (out / "summary.md").read_text() == printed.rstrip("\n") + "\n"
    with open(out / "summary.csv", newline="") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["fixed", "paper", "cohen"]
    picture = plt.imread(out / "certified_accuracy.png")
    assert picture.shape[0] > 500 and picture.shape[1] > 800
    assert picture[..., :3].std() > 0.05  # not a blank canvas


def test_plot_accepts_a_mapping_of_rows(tmp_path):
    rows = [make_row(i, *values) for i, values in enumerate(ROWS)]
    path = plot_certified_accuracy({"a": rows, "b": rows[:3]}, tmp_path / "plot.png")
    assert path.stat().st_size > 20_000


def test_sigma_maps_from_tensors_and_run_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sigma = torch.linspace(0.5, 2.0, 64).reshape(1, 8, 8)
    torch.save(sigma, run / "sigma.pt")
    torch.save(torch.zeros(1, 8, 8), run / "mu.pt")
    path = plot_sigma_maps({"from a run": run, "from a tensor": sigma.flip(-1)}, tmp_path / "sigma_maps.png")
    picture = plt.imread(path)
    assert picture.shape[0] > 400 and picture[..., :3].std() > 0.05
    with pytest.raises(FileNotFoundError, match="no sigma"):
        plot_sigma_maps([tmp_path / "missing"], tmp_path / "x.png")


def test_clear_errors(ucan_file, tmp_path, capsys):
    broken = tmp_path / "broken.tsv"
    broken.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tnope\t1\t0.5\n")
    assert main(["analyze", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert f"{broken}, line 2, column radius" in capsys.readouterr().err
    empty = tmp_path / "empty.tsv"
    empty.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    with pytest.raises(ResultFileError, match="no result rows"):
        summarize([empty])
    with pytest.raises(ValueError, match="one label per file"):
        summarize([ucan_file], labels=["a", "b"])


# -- what the plot draws: panels, title, legend, the Clopper-Pearson cap, the images band -----------------

def draw(sources, **options):
    figure = analyze.certified_accuracy_figure(sources, **options)
    titles = [ax.get_title() for ax in figure.axes]
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    return figure, titles, legend


def test_only_panels_some_file_reports(ucan_file, cohen_file):
    figure, titles, _ = draw([cohen_file])
    assert titles == ["certified accuracy, l2 norm"]  # no empty l1, l_inf or ALM panels
    plt.close(figure)
    figure, titles, _ = draw([cohen_file], cohen_norm="linf")
    assert titles == ["certified accuracy, l_inf norm"]
    plt.close(figure)
    figure, titles, _ = draw([cohen_file, ucan_file])
    assert len(titles) == 4 and titles[3].startswith("ALM: volume-equivalent radius, NOT a certified radius")
    plt.close(figure)


def test_title_says_dashed_only_when_something_is_dashed(ucan_file, paper_file):
    figure, _, legend = draw([ucan_file])
    assert figure.get_suptitle() == "Certified accuracy against radius"
    assert not any(NOT_CERTIFICATE in text for text in legend)
    plt.close(figure)
    figure, _, legend = draw([ucan_file, paper_file])
    assert "dashed: not a certificate" in figure.get_suptitle()
    assert [text for text in legend if NOT_CERTIFICATE in text] == [
        "paper: n = 1,000, alpha = 0.001, 5 images (no image reached the CP cap): " + NOT_CERTIFICATE]
    plt.close(figure)


def test_the_clopper_pearson_cap_is_drawn_where_n_samples_stop(tmp_path):
    p_cap = 0.001 ** (1 / 1000)  # all 1,000 votes for one class
    rows = [make_row(i, *values) for i, values in enumerate(ROWS)]
    rows[1].update(p_lower=p_cap, radius_l1=1.2, radius_l2=1.2, radius_linf=0.05, alm=1.6)  # all votes agreed
    (method,) = analyze.load_methods({"iso": rows})
    assert analyze.clopper_pearson_cap(method, "l2") == 1.2
    assert analyze.clopper_pearson_cap(method, "linf") == 0.05
    figure, titles, legend = draw({"iso": rows})
    assert "iso: n = 1,000, alpha = 0.001, 5 images" in legend
    assert any(text.startswith("iso: CP cap at n=1,000") for text in legend)
    for ax, cap in zip(figure.axes, (1.2, 1.2, 0.05, 1.6)):
        dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
        assert len(dotted) == 1 and set(dotted[0].get_xdata()) == {cap}
    plt.close(figure)
    # No image reached the cap: nothing to draw, and the legend says why.
    figure, _, legend = draw({"weak": [make_row(i, *values) for i, values in enumerate(ROWS)]})
    assert not any(line.get_linestyle() == ":" for ax in figure.axes for line in ax.lines)
    assert "weak: n = 1,000, alpha = 0.001, 5 images (no image reached the CP cap)" in legend
    plt.close(figure)


def test_no_cap_without_a_single_n(tmp_path, cohen_file):
    rows = [{**make_row(i, *values), "p_lower": 0.001 ** (1 / 1000), "mode": "sequential-cp",
             "decided_radius": 0.25, "samples_used": 1000} for i, values in enumerate(ROWS)]
    mixed = [make_row(i, *values) for i, values in enumerate(ROWS)]
    mixed[0]["n"] = 2000
    figure, _, legend = draw({"seq": rows, "mixed": mixed, "cohen": cohen_file})
    assert not any(line.get_linestyle() == ":" for ax in figure.axes for line in ax.lines)
    assert any(text.startswith("seq: sequential") and "no single n: no CP cap" in text for text in legend)
    assert any(text.startswith("mixed: no single n and alpha") for text in legend)
    assert "cohen: 4 images (Cohen format: n, alpha not recorded; no CP cap)" in legend
    plt.close(figure)


def test_image_band_is_clopper_pearson_over_the_images(ucan_file):
    from scipy.stats import beta

    lower, upper = analyze.image_band([0.0, 0.5, 1.0], images=10, alpha=0.05)
    assert lower[0] == 0 and upper[2] == 1
    assert lower[1] == pytest.approx(beta.ppf(0.025, 5, 6)) and upper[1] == pytest.approx(beta.ppf(0.975, 6, 5))
    assert upper[0] == pytest.approx(1 - 0.025 ** (1 / 10)) and lower[2] == pytest.approx(0.025 ** (1 / 10))
    figure, _, legend = draw([ucan_file])
    assert all(len(ax.collections) == 1 for ax in figure.axes)  # one shaded band per curve
    assert any("95% band over the choice of test images" in text and "not a certificate" in text for text in legend)
    plt.close(figure)
    figure, _, legend = draw([ucan_file], band_alpha=None)
    assert all(not ax.collections for ax in figure.axes) and not any("band" in text for text in legend)
    plt.close(figure)


# -- analysis.json: what an analysis used ------------------------------------------------------------------

def test_cli_records_what_it_used(ucan_file, cohen_file, tmp_path, monkeypatch):
    import json

    from ucan_smoothing.fileio import file_sha256

    out = tmp_path / "report"
    argv = ["analyze", str(ucan_file), str(cohen_file), "--label", "fixed", "--label", "cohen",
            "--radii-linf", "0.01", "0", "--out", str(out)]
    monkeypatch.setattr("sys.argv", ["ucan", *argv])
    assert main(argv) == 0
    record = json.loads((out / "analysis.json").read_text())
    assert record["command"] == "ucan " + " ".join(argv)
    assert record["labels"] == ["fixed", "cohen"]
    assert record["radii"]["linf"] == [0.0, 0.01] and record["radii"]["l2"] == list(analyze.DEFAULT_RADII["l2"])
    fixed, cohen = record["inputs"]
    assert fixed["path"] == str(ucan_file) and fixed["sha256"] == file_sha256(ucan_file)
    assert fixed["sidecar"]["config"] == {"test": str(ucan_file)} and fixed["images"] == 5
    assert cohen["sha256"] == file_sha256(cohen_file) and cohen["sidecar"] is None
    assert "radius read as l2" in cohen["format"]
    versions = record["environment"]
    assert versions["numpy"] and versions["scipy"] and versions["matplotlib"] and versions["python"]
    assert set(record["outputs"]) == {str(out / name) for name in ("summary.md", "summary.csv",
                                                                   "certified_accuracy.png")}
    assert not list(out.glob(".*.tmp"))  # written atomically: no temporary file left


def test_a_missing_sigma_map_is_refused_before_anything_is_written(ucan_file, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", str(ucan_file), "--sigma", str(tmp_path / "no-run"), "--out", str(out)]) == 2
    assert "no sigma map at" in capsys.readouterr().err
    assert not out.exists()
