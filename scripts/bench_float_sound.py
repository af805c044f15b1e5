"""Cost of the float-sound mode (docs/float_sound.md): radius against Cohen's continuous
Gaussian, and sampling speed against torch.randn for a CIFAR-sized batch.

    .venv/bin/python scripts/bench_float_sound.py [--device cuda] [--rounds 10]

Speed: one process, rounds alternating between the two samplers (so load changes hit both),
median seconds per batch of each; also the snapping that SnapToGrid adds before the network.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ucan_smoothing.core.float_sound import GRID_STEP, RoundedGaussian, grid_value, rounding_table, snap_to_indices
from ucan_smoothing.core.noises import Gaussian

SCALES = (0.12, 0.25, 0.5)
PROBABILITIES = (0.9, 0.99, 0.999)
DIMS = {"CIFAR-10": 3 * 32 * 32, "ImageNet": 3 * 224 * 224}


def radius_table() -> None:
    print(f"l2 radius, step 1/255: Cohen sigma*PhiInv(p) vs float-sound sigma*PhiInv(p - d*tau)")
    print(f"{'sigma':>6} {'p':>6} {'Cohen':>10} " + " ".join(f"{name + ' loss':>16}" for name in DIMS))
    for scale in SCALES:
        sound, continuous = RoundedGaussian(scale), Gaussian(scale)
        for p in PROBABILITIES:
            cohen = continuous.radius(p, 2, 1)
            losses = [cohen - sound.radius(p, 2, dim) for dim in DIMS.values()]
            print(f"{scale:>6} {p:>6} {cohen:>10.6f} " + " ".join(f"{loss:>16.3e}" for loss in losses))
        print(f"{'':>6} tau = {sound.table.tv:.3e} per coordinate, J = {sound.table.half_width}; "
              + ", ".join(f"eta({name}) = {sound.total_variation(dim):.2e}" for name, dim in DIMS.items()))


def timed(function, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(device: torch.device, rounds: int, scale: float = 0.25) -> None:
    shape = (1000, 3, 32, 32)
    start = time.perf_counter()
    rounding_table.cache_clear()
    noise = RoundedGaussian(scale)
    build = time.perf_counter() - start
    generator = torch.Generator(device=device).manual_seed(0)
    x = grid_value(torch.randint(0, 256, shape[1:], generator=generator, device=device), GRID_STEP, torch.float32)
    samplers = {
        "randn": lambda: Gaussian(scale).sample(shape, generator=generator, device=device, dtype=torch.float32),
        "rounded": lambda: noise.sample(shape, generator=generator, device=device, dtype=torch.float32),
    }
    noisy = noise.sample(shape, generator=generator, device=device, dtype=torch.float32) + x
    snap = lambda: grid_value(snap_to_indices(noisy, GRID_STEP), GRID_STEP, torch.float32)  # noqa: E731
    for function in (*samplers.values(), snap):  # warm-up: tables on the device, allocator
        function()
    times = {name: [] for name in (*samplers, "snap")}
    for _ in range(rounds):
        for name, function in samplers.items():
            times[name].append(timed(function, device))
        times["snap"].append(timed(snap, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nsampling {shape} float32 on {device}, sigma {scale}, {rounds} alternating rounds "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads); table built in {build:.2f} s")
    for name, value in median.items():
        print(f"  {name:>8}: {value * 1e3:8.2f} ms")
    print(f"  rounded / randn = {median['rounded'] / median['randn']:.2f}; "
          f"(rounded + snap) / randn = {(median['rounded'] + median['snap']) / median['randn']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    radius_table()
    speed(torch.device(args.device), args.rounds)


if __name__ == "__main__":
    main()
