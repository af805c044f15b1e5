"""`ucan bench` runs end to end, compares every figure with the best raw forward pass, and
flags what only measurement noise explains.

Timings are not asserted (shared machines are noisy): the benchmark prints them.
"""

import json
import os

import pytest

from ucan_smoothing.cli import main
from ucan_smoothing.commands import bench

SMALL = ["bench", "--n", "100", "--n0", "10", "--batch-sizes", "50", "100", "--threads", "1",
         "--probe-budget", "0.2", "--no-art"]


@pytest.fixture
def no_memory_probe(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the memory probe ran without --memory-probe")
    monkeypatch.setattr(bench, "_peak_memory", refuse)


def test_bench_reports_each_figure_against_the_best_raw_forward(tmp_path, capsys, no_memory_probe):
    out = tmp_path / "bench.json"
    assert main(SMALL + ["--rounds", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    probe = result["probe"]["batch_size"]
    assert probe in (50, 100)
    assert {m["batch_size"] for m in result["probe"]["measurements"]} <= {50, 100}
    expected = {"raw forward, batch 50", "raw forward, batch 100", "certify, batch 50", "certify, batch 100",
                f"raw forward, model as given (NCHW), batch {probe}", f"raw forward + noise draw, batch {probe}",
                f"Cohen-style loop, batch {probe}", f"ucan certify's pool, batch {probe}",
                f"certify, fixed sigma, batch {probe}", f"certify + NPG, batch {probe}"}
    assert expected <= set(result["figures"])
    for name, figure in result["figures"].items():
        assert name in printed
        assert len(figure["rounds"]) == 2 and all(rate > 0 for rate in figure["rounds"])
        assert figure["spread_pct"] >= 0 and figure["best_samples_per_s"] >= figure["samples_per_s"]
    # the limit is the best raw forward pass over the batch sizes, and is compared with itself
    raws = [result["figures"][f"raw forward, batch {b}"]["samples_per_s"] for b in (50, 100)]
    assert result["summary"]["raw limit"]["samples_per_s"] == max(raws)
    assert result["summary"]["raw limit"]["ratio_to_raw_limit"] == 1.0
    assert result["summary"]["ucan certify at the probe's batch"]["batch_size"] == probe
    # the figure called ucan certify is the path `ucan certify` runs (the pool), not Smooth.certify
    assert (result["summary"]["ucan certify at the probe's batch"]["samples_per_s"]
            == result["figures"][f"ucan certify's pool, batch {probe}"]["samples_per_s"])
    assert result["summary"]["Smooth.certify at the probe's batch"]["batch_size"] == probe
    conditions = result["conditions"]
    assert conditions["threads"] == 1 and conditions["device"] == "cpu" and conditions["rounds"] == 2
    assert conditions["batch_sizes"] == [50, 100] and len(conditions["load_average_start"]) == 3
    assert "load average" in printed and "NPG overhead" in printed and "other processes" in printed
    assert all(use is None or use >= 0 for use in (conditions["other_cpu_use_start"], conditions["other_cpu_use_end"]))
    assert result["memory"] == {}


def test_amp_adds_its_own_sweep_compared_with_its_own_limit(tmp_path, no_memory_probe):
    out = tmp_path / "bench.json"
    assert main(["bench", "--n", "40", "--n0", "10", "--batch-sizes", "20", "--threads", "1", "--probe-budget", "0.2",
                 "--no-art", "--rounds", "1", "--amp", "bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"raw forward + bf16, batch 20", "certify + bf16, batch 20"} <= set(result["figures"])
    assert result["figures"]["raw forward + bf16, batch 20"]["ratio_to_raw_limit"] == 1.0
    assert result["summary"]["ucan certify + bf16 at the probe's batch"]["batch_size"] == 20


def test_one_round_warns_that_no_spread_was_measured(capsys, no_memory_probe):
    assert main(SMALL + ["--rounds", "1"]) == 0
    assert "WARNING: one round: no spread measured" in capsys.readouterr().out


def _report(rates):
    methods = {}
    for name, values in rates.items():
        batch = int(name.rsplit(" ", 1)[1])
        methods[name] = bench.Method(name, None, 1, batch, rates=list(values))
    return bench.Report(methods)


def test_a_ratio_above_the_raw_limit_and_a_wide_spread_are_flagged():
    report = _report({"raw forward, batch 8": [100, 101], "raw forward, batch 16": [200, 200],
                      "certify, batch 16": [210, 210], "certify, batch 8": [50, 90]})
    assert report.limit().name == "raw forward, batch 16"
    report.check_noise()
    above, spread = report.warnings
    assert "above the raw limit" in above and "certify, batch 16 (1.050)" in above
    assert "raw forward" not in above
    assert "above 5% for 1 of 4 figures" in spread and "certify, batch 8 (57%)" in spread


def test_quiet_figures_below_the_limit_get_no_warning():
    report = _report({"raw forward, batch 8": [100, 101], "certify, batch 8": [97, 98]})
    report.check_noise()
    assert report.warnings == []


def test_a_negative_npg_overhead_is_flagged_as_noise():
    report = _report({"fixed, batch 8": [100], "npg, batch 8": [110]})
    assert report.npg_overhead("fixed, batch 8", "npg, batch 8") == pytest.approx(100 / 110 - 1)
    assert len(report.warnings) == 1 and "negative" in report.warnings[0]
    report = _report({"fixed, batch 8": [100], "npg, batch 8": [90]})
    report.npg_overhead("fixed, batch 8", "npg, batch 8")
    assert report.warnings == []


def test_the_memory_probe_runs_only_when_asked(tmp_path, capsys, monkeypatch):
    asked = []

    def fake_peak_memory(args, n, batch):
        asked.append((n, batch))
        return {"peak_rss_mib": 1.0, "added_mib": 0.0}
    monkeypatch.setattr(bench, "_peak_memory", fake_peak_memory)
    out = tmp_path / "bench.json"
    assert main(SMALL + ["--rounds", "1", "--memory-probe", "--json", str(out)]) == 0
    probe = json.loads(out.read_text())["probe"]["batch_size"]
    assert asked == [(10_000, probe), (100_000, probe)]
    assert set(json.loads(out.read_text())["memory"]) == {"10000", "100000"}


def test_the_memory_child_prints_its_peak(capsys):
    assert main(["bench", "--memory-child", "200", "--memory-batch", "50", "--n0", "10", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["peak_rss_mib"] > 0 and result["added_mib"] >= 0


@pytest.mark.parametrize("option, message", [(["--rounds", "0"], "--rounds must be >= 1"),
                                             (["--batch-sizes", "0"], "--batch-sizes must be positive"),
                                             (["--json", "/no/such/dir/b.json"], "no such directory")])
def test_bad_options_end_with_one_line(capsys, option, message):
    assert main(SMALL + option) == 2
    err = capsys.readouterr().err
    assert "ucan bench: error:" in err and message in err


def test_art_at_its_default_and_at_every_batch_size(tmp_path, no_memory_probe):
    pytest.importorskip("art")
    out = tmp_path / "bench.json"
    command = [arg for arg in SMALL if arg != "--no-art"]
    assert main(command + ["--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"ART certify, batch 32", "ART certify, batch 50", "ART certify, batch 100",
            "ART certify, model as given (NCHW), batch 32"} <= set(result["figures"])
    assert result["summary"]["ART at its default batch"]["batch_size"] == 32
    assert result["summary"]["ART at its best batch"]["batch_size"] in (32, 50, 100)


def test_other_cpu_use_counts_busy_time_of_all_cpus_between_two_reads():
    from ucan_smoothing.commands.bench import other_cpu_use

    # (busy, total) jiffies summed over the CPUs: 30 of 100 busy while the benchmark slept
    reads = iter([(1_000, 5_000), (1_030, 5_100)])
    slept = []
    use = other_cpu_use(0.5, read=lambda: next(reads), sleep=slept.append, own=lambda: 0.0)
    assert slept == [0.5] and use == pytest.approx(0.3 * (os.cpu_count() or 1))
    # this process's own threads spinning in the window are not "other processes"
    reads = iter([(1_000, 5_000), (1_000 + 50 * (os.cpu_count() or 1), 5_100)])  # half of every CPU busy
    clock = iter([0.0, 1e9])  # our own CPU time: far more than the window, so all of it was ours
    assert other_cpu_use(0.0, read=lambda: next(reads), sleep=lambda s: None, own=lambda: next(clock)) == 0.0
    # no /proc/stat (not Linux), or a counter that did not move: not measurable, not zero
    assert other_cpu_use(0.0, read=lambda: None, sleep=lambda s: None) is None
    same = iter([(10, 20), (10, 20)])
    assert other_cpu_use(0.0, read=lambda: next(same), sleep=lambda s: None) is None


def test_cpu_times_reads_this_machines_counters():
    from ucan_smoothing.commands.bench import _cpu_times

    times = _cpu_times()
    if times is None:
        pytest.skip("no /proc/stat here")
    busy, total = times
    assert 0 <= busy <= total and total > 0


@pytest.mark.parametrize("others, loadavg, warned", [(0.0, 9.0, False), (1.5, 0.0, True)])
def test_the_competition_warning_follows_other_processes_cpu_use_not_the_load_average(
        capsys, monkeypatch, no_memory_probe, others, loadavg, warned):
    # the 1-minute load average still holds a run that just finished: it warned on quiet machines
    monkeypatch.setattr(bench, "other_cpu_use", lambda *args, **kwargs: others)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (loadavg, loadavg, loadavg))
    assert main(SMALL + ["--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"other processes used {others:.2f} CPUs in the second before" in printed
    assert ("compete for the machine" in printed) == warned
