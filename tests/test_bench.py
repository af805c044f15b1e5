"""`ucan bench` runs end to end and reports every method against its own raw forward pass.

Timings are not asserted (shared machines are noisy): the benchmark prints them.
"""

import json

from ucan_smoothing.cli import main


def test_bench_reports_each_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--n", "300", "--n0", "10", "--batch-size", "100", "--rounds", "1", "--threads", "1",
                 "--amp", "bf16", "--memory", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = {"raw forward (limit)", "raw forward, channels-last", "Smooth.certify", "certify, channels-last",
                "Cohen-style loop", "certify, fixed sigma", "certify + NPG", "raw forward, channels-last + bf16",
                "certify, channels-last + bf16"}
    assert expected <= set(result["samples_per_s"])
    assert all(value > 0 for value in result["samples_per_s"].values())
    for name in result["samples_per_s"]:
        assert name in printed
    assert "NPG overhead" in printed
