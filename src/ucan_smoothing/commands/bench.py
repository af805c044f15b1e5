"""Throughput benchmark: how close certification runs to the model's best raw forward pass.

Measured in one run, on the same model (stored channels-last, as `ucan certify`
runs it), input and device, at each batch size of ``--batch-sizes``:

1. raw forward: ``model(noisy_batch)`` on a batch made once; the best over the
   batch sizes is the limit every figure is compared with;
2. ``Smooth.certify`` (noise drawn on the device, votes counted per batch);
   at the probe's batch also the pool that `ucan certify` runs for fixed noise
   (``core.pool.certify_pool``: per-image noise streams in quanta);
3. IBM ART's ``PyTorchRandomizedSmoothing.certify``, when the optional package
   ``adversarial-robustness-toolbox`` is installed (also at ART's own default
   batch size, on the model as given: what an ART user runs).

Then, at the batch size the probe of ``core.batch_size`` picks (what `ucan
certify` picks by default): the raw forward of the model as given (NCHW), the
raw forward with a fresh noise draw per batch (the cost of the noise), a
Cohen-style reference loop written here, and the NPG overhead (a universal
generator evaluated for each image against the same noise with sigma computed
beforehand). ``--amp`` adds the raw forward and certify sweeps under autocast.

Every figure is timed once per round; rounds alternate the order of the
methods (A B ... B A) and the median over rounds is reported with its spread
((max - min) / median). A WARNING line flags a spread above 5%, a ratio above
1 to the raw limit and a negative overhead: those are measurement noise. The CPU
time other processes use in the second before and after the run (``/proc/stat``,
while the benchmark sleeps) is printed, and flagged above a quarter of a CPU.
``--memory-probe`` measures the peak memory of certify for n = 10,000 and
100,000 in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.batch_size import default_candidates, fastest_batch_size
from ..core.noises import Gaussian
from ..core.pool import certify_pool
from ..core.smooth import Smooth
from ..fileio import atomic_write_text
from ..allocator import malloc_state
from ..models import Autocast, build_model, model_spec, to_channels_last
from ..npg.generators import UniversalGenerator

#: a spread over rounds above this (% of the median) gets a WARNING
NOISY_SPREAD_PCT = 5.0
#: peak memory of certify is measured at these n with --memory-probe
MEMORY_PROBE_N = (10_000, 100_000)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mnist_cnn", help="model name (default: mnist_cnn)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                        help="batch sizes of the sweep (default: the probe's candidates for the device, "
                             "8..1024 on a CPU, 16..4096 on a GPU)")
    parser.add_argument("--n", type=int, default=20_000, help="estimation samples per certify call")
    parser.add_argument("--n0", type=int, default=100, help="selection samples of each certification")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--scale", type=float, default=0.25, help="Gaussian noise level")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    parser.add_argument("--probe-budget", type=float, default=2.0,
                        help="seconds of the batch-size probe (default: 2)")
    parser.add_argument("--memory-probe", action="store_true",
                        help=f"also measure the peak memory of certify at n = {' and '.join(map(str, MEMORY_PROBE_N))}"
                             " (fresh subprocesses; slow)")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="also measure the model under autocast (as `ucan certify --amp`)")
    parser.add_argument("--no-art", action="store_true", help="leave IBM ART out even when it is installed")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch", type=int, default=1000, help=argparse.SUPPRESS)


@dataclass
class Method:
    """One figure: ``run()`` processes ``samples`` samples at ``batch`` once."""

    name: str
    run: object
    samples: int
    batch: int | None = None
    #: "" or " + bf16"/" + fp16": the figure is compared with the raw limit of its group
    group: str = ""
    rates: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        """The fastest round: on a loaded machine, the least disturbed one."""
        return max(self.rates)

    @property
    def spread_pct(self) -> float | None:
        if len(self.rates) < 2:
            return None
        return 100 * (max(self.rates) - min(self.rates)) / self.median


def _check_args(args) -> None:
    for name in ("n", "n0", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.probe_budget <= 0:
        raise ValueError(f"--probe-budget must be positive, got {args.probe_budget}")
    if args.scale <= 0:
        raise ValueError(f"--scale must be positive, got {args.scale}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"--json: no such directory: {os.path.dirname(os.path.abspath(args.json))!r}")


def _setup(args):
    torch.manual_seed(args.seed)
    spec = model_spec(args.model)
    model = build_model(args.model).to(args.device).eval()
    x = torch.rand(spec.input_shape, device=args.device)
    return model, spec, x


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cohen_reference_certify(model, x, noise_scale, n0, n, batch_size, num_classes, alpha=0.001):
    """Cohen et al.'s loop as usually written: one image, noise drawn per batch on the
    device, predictions copied to the host and counted with NumPy."""
    from scipy.stats import beta

    def sample(num):
        counts = np.zeros(num_classes, dtype=int)
        with torch.no_grad():
            remaining = num
            while remaining > 0:
                size = min(batch_size, remaining)
                remaining -= size
                batch = x.repeat((size, 1, 1, 1))
                noise = torch.randn_like(batch) * noise_scale
                predictions = model(batch + noise).argmax(1)
                counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts

    top = sample(n0).argmax()
    k = sample(n)[top]
    return beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0


def _art_classifier(model, spec, args):
    """ART's randomized smoothing classifier, or None when ART is not installed."""
    try:
        from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
    except ImportError:
        return None
    return PyTorchRandomizedSmoothing(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=spec.input_shape,
        nb_classes=spec.num_classes, clip_values=(0.0, 1.0), sample_size=args.n0,
        scale=args.scale, alpha=0.001, device_type="gpu" if args.device.startswith("cuda") else "cpu",
    )


def _art_default_batch(classifier) -> int:
    """The batch size ART's certify uses when none is given."""
    return inspect.signature(classifier.certify).parameters["batch_size"].default


def _raw_forward(net, x, noise, samples, batch, device):
    noisy = (x + noise.sample((batch, *x.shape), device=device)).contiguous()
    batches = -(-samples // batch)

    def forward():
        with torch.inference_mode():
            for _ in range(batches):
                net(noisy).argmax(1)
        _synchronize(device)
    return forward, batches * batch


def _forward_with_fresh_noise(net, x, noise, samples, batch, device):
    """The raw forward pass plus a fresh noise draw per batch: the work any certify must do."""
    generator = torch.Generator(device=device).manual_seed(0)

    def forward():
        with torch.inference_mode():
            for _ in range(-(-samples // batch)):
                noisy = noise.sample((batch, *x.shape), generator=generator, device=device)
                noisy += x
                net(noisy).argmax(1)
        _synchronize(device)
    return forward


def _certify(net, spec, noise, x, args, batch):
    smooth = Smooth(net, spec.num_classes, noise)

    def run():
        smooth.certify(x, args.n0, args.n, 0.001, batch, generator=args.seed)
        _synchronize(args.device)
    return run


def _certify_pooled(net, spec, noise, x, args, batch):
    """What `ucan certify` runs for fixed noise: the pool (core/pool.py), one noise stream per
    image in quanta, the votes counted per image."""
    smooth = Smooth(net, spec.num_classes, noise)

    def run():
        for _ in certify_pool(smooth, [(0, x)], args.n0, args.n, 0.001, seed=args.seed, batch_size=batch):
            pass
        _synchronize(args.device)
    return run


def _art_certify(classifier, x, args, batch):
    image = x[None].cpu().numpy()
    return lambda: classifier.certify(image, n=args.n, batch_size=batch)


def _sweep(label, net, spec, noise, x, args, sizes):
    """Raw forward and certify of ``net`` at each batch size."""
    samples = args.n0 + args.n
    methods = []
    for batch in sizes:
        forward, processed = _raw_forward(net, x, noise, samples, batch, args.device)
        methods.append(Method(f"raw forward{label}, batch {batch}", forward, processed, batch, label))
        methods.append(Method(f"certify{label}, batch {batch}", _certify(net, spec, noise, x, args, batch),
                              samples, batch, label))
    return methods


def _warm_up(nets, x, noise, sizes, device) -> None:
    """One batch of each net at each size: kernels of each shape, allocator, thread pools."""
    with torch.inference_mode():
        for net in nets:
            for batch in sorted(sizes):
                net(x + noise.sample((batch, *x.shape), device=device))
    _synchronize(device)


def _time_rounds(methods, rounds) -> None:
    """One timing of every method per round, in alternating order (A B ... B A ...)."""
    for round_index in range(rounds):
        order = methods if round_index % 2 == 0 else methods[::-1]
        for method in order:
            start = time.perf_counter()
            method.run()
            method.rates.append(method.samples / (time.perf_counter() - start))


#: other processes using more than this many CPUs' worth around the run get a WARNING
OTHER_CPU_WARN = 0.25


def _cpu_times() -> tuple | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def other_cpu_use(seconds: float = 1.0, read=_cpu_times, sleep=time.sleep, own=time.process_time) -> float | None:
    """CPUs' worth of work done by other processes over ``seconds`` while this one sleeps.

    This process's own CPU time in the window (worker threads still spinning after the timed
    rounds) is subtracted. Why not the load average: its 1-minute mean still holds work that
    finished just before (a previous benchmark run, paused jobs), so it flagged quiet machines."""
    before, own_before, wall_before = read(), own(), time.perf_counter()
    sleep(seconds)
    after, own_after, wall = read(), own(), time.perf_counter() - wall_before
    if before is None or after is None or after[1] <= before[1]:
        return None
    cpus = os.cpu_count() or 1
    machine = (after[0] - before[0]) / (after[1] - before[1]) * cpus
    mine = (own_after - own_before) / wall if wall > 0 else 0.0
    return max(0.0, machine - mine)


def _conditions(args, sizes) -> dict:
    device_name = (torch.cuda.get_device_name(torch.device(args.device))
                   if args.device.startswith("cuda") else platform.processor() or platform.machine())
    return {"model": args.model, "device": args.device, "device_name": device_name,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "batch_sizes": list(sizes),
            "rounds": args.rounds, "n0": args.n0, "n": args.n, "scale": args.scale, "amp": args.amp,
            "load_average_start": list(os.getloadavg()), "other_cpu_use_start": other_cpu_use(),
            "torch": torch.__version__, "malloc": malloc_state()}


def _other_use_text(conditions: dict) -> str:
    start, end = conditions["other_cpu_use_start"], conditions["other_cpu_use_end"]
    if start is None or end is None:
        return "other processes' CPU use not measurable here"
    return f"other processes used {start:.2f} CPUs in the second before and {end:.2f} in the second after"


class Report:
    """The printed table, the summary lines and the warnings."""

    def __init__(self, methods: dict):
        self.methods = methods
        self.lines, self.warnings, self.summary = [], [], {}

    def limit(self, group=""):
        """The best raw forward pass of ``group`` over the batch sizes."""
        raws = [m for name, m in self.methods.items() if name.startswith(f"raw forward{group}, batch")]
        return max(raws, key=lambda m: m.median)

    def ratio(self, method) -> float:
        return method.median / self.limit(method.group).median

    def figure(self, key, name):
        """A summary line: ``name``'s median, spread and ratio to its raw limit."""
        method = self.methods[name]
        self.summary[key] = {"method": name, "batch_size": method.batch, "samples_per_s": method.median,
                             "spread_pct": method.spread_pct, "ratio_to_raw_limit": self.ratio(method)}
        self.lines.append(f"  {key} (batch {method.batch}): {method.median:,.0f} samples/s"
                          f"{_spread_text(method)}, {self.ratio(method):.3f} of the raw limit")
        return method

    def npg_overhead(self, fixed_name, npg_name) -> float:
        """How much slower certify runs with the generator evaluated per image than with sigma fixed."""
        overhead = self.methods[fixed_name].median / self.methods[npg_name].median - 1
        self.lines.append(f"  NPG overhead (universal generator per image vs fixed sigma): {100 * overhead:+.2f}%")
        if overhead < 0:
            self.warnings.append(f"NPG overhead is negative ({100 * overhead:+.2f}%): evaluating a generator "
                                 f"cannot make certify faster, this is measurement noise")
        return overhead

    def check_noise(self):
        """Warnings for what only measurement noise explains."""
        above = [f"{name} ({self.ratio(m):.3f})" for name, m in self.methods.items() if self.ratio(m) > 1.0]
        if above:
            self.warnings.append("above the raw limit, which is impossible (measurement noise): " + ", ".join(above))
        noisy = [f"{name} ({m.spread_pct:.0f}%)" for name, m in self.methods.items()
                 if m.spread_pct is not None and m.spread_pct > NOISY_SPREAD_PCT]
        if noisy:
            self.warnings.append(f"spread over rounds above {NOISY_SPREAD_PCT:.0f}% for {len(noisy)} of "
                                 f"{len(self.methods)} figures, read them as noise of that size: " + ", ".join(noisy))
        if any(m.spread_pct is None for m in self.methods.values()):
            self.warnings.append("one round: no spread measured, every figure may be off by tens of %; "
                                 "use --rounds 3 or more")


def _spread_text(method) -> str:
    return "" if method.spread_pct is None else f" (spread {method.spread_pct:.1f}%)"


def _print_table(report) -> None:
    width = max(len(name) for name in report.methods) + 2
    print(f"{'method':<{width}}{'samples/s':>12}{'spread':>9}{'ratio to raw limit':>20}{'best round':>12}")
    for name, method in report.methods.items():
        spread = "-" if method.spread_pct is None else f"{method.spread_pct:.1f}%"
        print(f"{name:<{width}}{method.median:>12,.0f}{spread:>9}{report.ratio(method):>20.3f}{method.best:>12,.0f}")


def _memory_child(args) -> int:
    """Run certify with n = args.memory_child and print the peak memory (MiB) it added
    above a warm-up call with two batches (imports, thread pools and allocator
    caches are paid by the warm-up, so what remains is what scales with n)."""
    import resource

    model, spec, x = _setup(args)
    smooth = Smooth(to_channels_last(model), spec.num_classes, Gaussian(args.scale))
    batch = args.memory_batch
    smooth.certify(x, args.n0, 2 * batch, 0.001, batch, generator=args.seed)
    warm_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    smooth.certify(x, args.n0, args.memory_child, 0.001, batch, generator=args.seed)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"peak_rss_mib": round(peak_kib / 1024, 1), "added_mib": round((peak_kib - warm_kib) / 1024, 1)}
    if args.device.startswith("cuda"):
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))
    return 0


def _peak_memory(args, n, batch):
    command = [sys.executable, "-m", "ucan_smoothing.cli", "bench", "--model", args.model,
               "--memory-batch", str(batch), "--n0", str(args.n0), "--device", args.device,
               "--scale", str(args.scale), "--memory-child", str(n), "--threads", str(torch.get_num_threads())]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(args) -> int:
    if args.memory_child is not None:
        return _memory_child(args)
    _check_args(args)
    sizes = sorted(set(args.batch_sizes or default_candidates(args.device)))
    conditions = _conditions(args, sizes)
    model, spec, x = _setup(args)
    given = model
    model = to_channels_last(copy.deepcopy(given))  # what `ucan certify` runs by default
    noise = Gaussian(args.scale)
    samples = args.n0 + args.n

    probe_start = time.perf_counter()
    probe_batch, probe_measurements = fastest_batch_size(model, noise, x, candidates=sizes,
                                                         budget_s=args.probe_budget, device=args.device)
    probe_seconds = time.perf_counter() - probe_start

    methods = _sweep("", model, spec, noise, x, args, sizes)
    forward_given, processed = _raw_forward(given, x, noise, samples, probe_batch, args.device)
    methods.append(Method(f"raw forward, model as given (NCHW), batch {probe_batch}", forward_given, processed,
                          probe_batch))
    methods.append(Method(f"raw forward + noise draw, batch {probe_batch}",
                          _forward_with_fresh_noise(model, x, noise, samples, probe_batch, args.device),
                          processed, probe_batch))
    methods.append(Method(f"ucan certify's pool, batch {probe_batch}",
                          _certify_pooled(model, spec, noise, x, args, probe_batch), samples, probe_batch))
    methods.append(Method(f"Cohen-style loop, batch {probe_batch}",
                          lambda: cohen_reference_certify(model, x, args.scale, args.n0, args.n, probe_batch,
                                                          spec.num_classes), samples, probe_batch))
    npg = UniversalGenerator(spec.input_shape).to(args.device)
    methods.append(Method(f"certify, fixed sigma, batch {probe_batch}",
                          _certify(model, spec, npg.to_noise(noise), x, args, probe_batch), samples, probe_batch))

    def certify_with_npg():  # the generator is evaluated for the image, as in `ucan certify`
        Smooth(model, spec.num_classes, npg.to_noise(noise)).certify(
            x, args.n0, args.n, 0.001, probe_batch, generator=args.seed)
        _synchronize(args.device)
    methods.append(Method(f"certify + NPG, batch {probe_batch}", certify_with_npg, samples, probe_batch))

    art = None if args.no_art else _art_classifier(model, spec, args)
    if art is not None:
        art_default = _art_default_batch(art)
        for batch in sorted(set(sizes) | {art_default}):
            methods.append(Method(f"ART certify, batch {batch}", _art_certify(art, x, args, batch), samples, batch))
        methods.append(Method(f"ART certify, model as given (NCHW), batch {art_default}",
                              _art_certify(_art_classifier(given, spec, args), x, args, art_default),
                              samples, art_default))
    nets, amp_probe = [model, given], None
    if args.amp:
        amp_model = Autocast(model, args.amp)
        nets.append(amp_model)
        amp_probe, _ = fastest_batch_size(amp_model, noise, x, candidates=sizes, budget_s=args.probe_budget,
                                          device=args.device)
        methods += _sweep(f" + {args.amp}", amp_model, spec, noise, x, args, sizes)

    _warm_up(nets, x, noise, {m.batch for m in methods}, args.device)
    _time_rounds(methods, args.rounds)
    methods = {method.name: method for method in methods}
    conditions["load_average_end"] = list(os.getloadavg())
    conditions["other_cpu_use_end"] = other_cpu_use()

    report = Report(methods)
    limit = report.limit()
    print(f"model {args.model}, device {args.device} ({conditions['device_name']}), "
          f"{conditions['threads']} threads of {conditions['cpu_count']} CPUs, n0 {args.n0} + n {args.n}, "
          f"median of {args.rounds} alternating rounds, load average {conditions['load_average_start'][0]:.2f} "
          f"at the start and {conditions['load_average_end'][0]:.2f} at the end, {_other_use_text(conditions)}, "
          f"torch {torch.__version__}, malloc: {conditions['malloc']}")
    print(f"batch-size probe: batch {probe_batch} in {probe_seconds:.1f} s ({len(probe_measurements)} measurements)")
    _print_table(report)
    print("summary (the raw limit is the best raw forward pass over the batch sizes):")
    report.figure("raw limit", limit.name)
    ours = report.figure("ucan certify at the probe's batch", f"ucan certify's pool, batch {probe_batch}")
    report.figure("Smooth.certify at the probe's batch", f"certify, batch {probe_batch}")
    report.figure("certify at the best raw batch", f"certify, batch {limit.batch}")
    report.figure("Cohen-style loop", f"Cohen-style loop, batch {probe_batch}")
    if art is not None:
        art_methods = [m for name, m in methods.items() if name.startswith("ART certify, batch")]
        art_best = max(art_methods, key=lambda m: m.median)
        art_default_method = report.figure("ART at its default batch", f"ART certify, batch {art_default}")
        report.figure("ART at its default batch, model as given",
                      f"ART certify, model as given (NCHW), batch {art_default}")
        report.figure("ART at its best batch", art_best.name)
        report.lines.append(f"  ucan certify at the probe's batch / ART at its default batch: "
                            f"{ours.median / art_default_method.median:.2f}x; / ART at its best batch: "
                            f"{ours.median / art_best.median:.2f}x")
        same_batch = [f"{m.batch}: {methods[f'certify, batch {m.batch}'].median / m.median:.2f}x"
                      for m in art_methods if f"certify, batch {m.batch}" in methods]
        report.lines.append("  Smooth.certify / ART certify at the same batch: " + ", ".join(same_batch))
    else:
        report.lines.append('  (ART not installed: pip install -e ".[bench]" to compare)')
    if args.amp:
        report.figure(f"raw limit + {args.amp}", report.limit(f" + {args.amp}").name)
        report.figure(f"ucan certify + {args.amp} at the probe's batch", f"certify + {args.amp}, batch {amp_probe}")
    overhead = report.npg_overhead(f"certify, fixed sigma, batch {probe_batch}", f"certify + NPG, batch {probe_batch}")
    report.check_noise()
    others = [use for use in (conditions["other_cpu_use_start"], conditions["other_cpu_use_end"]) if use is not None]
    if others and max(others) > OTHER_CPU_WARN:
        report.warnings.append(f"other processes used up to {max(others):.2f} of {conditions['cpu_count']} CPUs "
                               f"around the run: they compete for the machine")
    elif not others and conditions["load_average_start"][0] > (conditions["cpu_count"] or 1):
        report.warnings.append(f"load average {conditions['load_average_start'][0]:.2f} on {conditions['cpu_count']}"
                               f" CPUs: other processes may compete for the machine")
    print("\n".join(report.lines))
    for warning in report.warnings:
        print(f"WARNING: {warning}")

    memory = {}
    if args.memory_probe:
        for n in MEMORY_PROBE_N:
            memory[n] = _peak_memory(args, n, probe_batch)
            print(f"peak memory of certify with n = {n:>7}: {memory[n]}")
    if args.json:
        figures = {name: {"samples_per_s": m.median, "best_samples_per_s": m.best, "spread_pct": m.spread_pct,
                          "rounds": m.rates,
                          "batch_size": m.batch, "ratio_to_raw_limit": report.ratio(m)}
                   for name, m in methods.items()}
        result = {"conditions": conditions, "figures": figures, "summary": report.summary,
                  "probe": {"batch_size": probe_batch, "seconds": probe_seconds, "measurements": probe_measurements},
                  "npg_overhead": overhead, "warnings": report.warnings, "memory": memory}
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0
