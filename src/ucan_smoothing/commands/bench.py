"""Throughput benchmark: how close Smooth.certify runs to the model's raw forward pass.

Measured in one run, on the same model, input, batch size and device:

1. raw forward: ``model(noisy_batch)`` on a batch made once (the limit),
   for the model as given and for the same weights stored channels-last;
2. ``Smooth.certify`` (noise drawn on the device, votes counted per batch) on
   both, each compared with its own raw forward;
3. a Cohen-style reference loop written here (one image at a time, noise
   drawn per batch, predictions moved to the host and counted in NumPy);
4. IBM ART's ``PyTorchRandomizedSmoothing.certify`` when the optional package
   ``adversarial-robustness-toolbox`` is installed, on both models;
5. with ``--amp``, the channels-last model under autocast (for GPUs);
6. the NPG overhead: certify with a universal generator evaluated for each
   image, against the same noise with sigma computed beforehand.

Timings alternate between methods over several rounds and report the median,
since shared machines are noisy. Peak memory of certify is measured for two
values of ``n`` in fresh subprocesses (the process's maximum resident size).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from ..core.noises import Gaussian
from ..core.smooth import Smooth
from ..models import Autocast, build_model, model_spec, to_channels_last
from ..npg.generators import UniversalGenerator


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mnist_cnn", help="model name (default: mnist_cnn)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--n", type=int, default=20_000, help="estimation samples per certify call")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--scale", type=float, default=0.25, help="Gaussian noise level")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--memory", type=int, nargs="*", default=[10_000, 100_000],
                        help="values of n whose peak memory is measured (empty: skip)")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="also measure the channels-last model under autocast (as `ucan certify --amp`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = model_spec(args.model)
    model = build_model(args.model).to(args.device).eval()
    x = torch.rand(spec.input_shape, device=args.device)
    return model, spec, x


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


def _art_certify(model, spec, x, args):
    """ART's randomized smoothing certify, or None when ART is not installed."""
    try:
        from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
    except ImportError:
        return None
    classifier = PyTorchRandomizedSmoothing(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=spec.input_shape,
        nb_classes=spec.num_classes, clip_values=(0.0, 1.0), sample_size=args.n0,
        scale=args.scale, alpha=0.001, device_type="gpu" if args.device.startswith("cuda") else "cpu",
    )
    batch = x[None].cpu().numpy()
    return lambda: classifier.certify(batch, n=args.n, batch_size=args.batch_size)


def _memory_child(args) -> int:
    """Run certify with n = args.memory_child and print the peak memory (MiB) it added
    above a warm-up call with two batches (imports, thread pools and allocator
    caches are paid by the warm-up, so what remains is what scales with n)."""
    import resource

    model, spec, x = _setup(args)
    smooth = Smooth(model, spec.num_classes, Gaussian(args.scale))
    smooth.certify(x, args.n0, 2 * args.batch_size, 0.001, args.batch_size, generator=args.seed)
    warm_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    smooth.certify(x, args.n0, args.memory_child, 0.001, args.batch_size, generator=args.seed)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"peak_rss_mib": round(peak_kib / 1024, 1), "added_mib": round((peak_kib - warm_kib) / 1024, 1)}
    if args.device.startswith("cuda"):
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))
    return 0


def _peak_memory(args, n):
    command = [sys.executable, "-m", "ucan_smoothing.cli", "bench", "--model", args.model,
               "--batch-size", str(args.batch_size), "--n0", str(args.n0), "--device", args.device,
               "--memory-child", str(n)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(args) -> int:
    if args.memory_child is not None:
        return _memory_child(args)
    model, spec, x = _setup(args)
    # the same weights stored channels-last (what `ucan certify` uses by default)
    fast_model = to_channels_last(copy.deepcopy(model))
    noise = Gaussian(args.scale)
    samples = args.n0 + args.n
    batches = -(-samples // args.batch_size)
    noisy = (x + noise.sample((args.batch_size, *spec.input_shape), device=args.device)).contiguous()

    def raw_forward(net):
        def forward():
            with torch.inference_mode():
                for _ in range(batches):
                    net(noisy).argmax(1)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        return forward

    def certify(net, noise_of_net=noise):
        smooth = Smooth(net, spec.num_classes, noise_of_net)
        return lambda: smooth.certify(x, args.n0, args.n, 0.001, args.batch_size, generator=args.seed)

    def reference():
        cohen_reference_certify(model, x, args.scale, args.n0, args.n, args.batch_size, spec.num_classes)

    # name: (function, samples it processes, the raw forward it is compared with)
    given, nhwc = "raw forward (limit)", "raw forward, channels-last"
    methods = {given: (raw_forward(model), batches * args.batch_size, given),
               nhwc: (raw_forward(fast_model), batches * args.batch_size, nhwc),
               "Smooth.certify": (certify(model), samples, given),
               "certify, channels-last": (certify(fast_model), samples, nhwc),
               "Cohen-style loop": (reference, samples, given)}
    # NPG overhead: a universal generator evaluated for every certified image,
    # against the same anisotropic noise with its sigma computed beforehand.
    npg = UniversalGenerator(spec.input_shape).to(args.device)

    def certify_with_npg():
        Smooth(model, spec.num_classes, npg.to_noise(noise)).certify(
            x, args.n0, args.n, 0.001, args.batch_size, generator=args.seed)

    methods["certify, fixed sigma"] = (certify(model, npg.to_noise(noise)), samples, given)
    methods["certify + NPG"] = (certify_with_npg, samples, given)
    if args.amp:
        amp_model, amp = Autocast(fast_model, args.amp), f"raw forward, channels-last + {args.amp}"
        methods[amp] = (raw_forward(amp_model), batches * args.batch_size, amp)
        methods[f"certify, channels-last + {args.amp}"] = (certify(amp_model), samples, amp)
    art = _art_certify(model, spec, x, args)
    if art is not None:
        methods["ART certify"] = (art, samples, given)
        methods["ART, channels-last model"] = (_art_certify(fast_model, spec, x, args), samples, nhwc)

    raw_forward(model)()  # warm-up: allocator, kernels, thread pools
    raw_forward(fast_model)()
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, (fn, _, _) in methods.items():
            times[name].append(_timed(fn))
    throughput = {name: methods[name][1] / statistics.median(t) for name, t in times.items()}

    print(f"model {args.model}, batch {args.batch_size}, n0 {args.n0} + n {args.n}, device {args.device}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    width = max(len(name) for name in throughput) + 2
    print(f"{'method':<{width}}{'samples/s':>12}{'ratio to its raw forward':>26}")
    for name, value in throughput.items():
        print(f"{name:<{width}}{value:>12.0f}{value / throughput[methods[name][2]]:>26.3f}")
    overhead = throughput["certify, fixed sigma"] / throughput["certify + NPG"] - 1
    print(f"NPG overhead (universal generator per image vs fixed sigma): {100 * overhead:+.2f}%")
    if art is None:
        print('(ART not installed: pip install -e ".[bench]" to compare)')
    else:
        fast = throughput["certify, channels-last"]
        print(f"certify (channels-last, as `ucan certify` runs) / ART on the model as given: "
              f"{fast / throughput['ART certify']:.2f}x; / ART on the channels-last model: "
              f"{fast / throughput['ART, channels-last model']:.2f}x")

    memory = {}
    for n in args.memory:
        memory[n] = _peak_memory(args, n)
        print(f"peak memory of certify with n = {n:>7}: {memory[n]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": vars(args), "samples_per_s": throughput, "npg_overhead": overhead, "memory": memory,
                       "torch": torch.__version__}, handle, indent=2, default=str)
    return 0
