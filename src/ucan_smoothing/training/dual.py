"""Train the selector of a dual-smoothing run (:mod:`ucan_smoothing.npg.dual`): ``ucan train-dual``.

The selector learns which expert to send each input to. Its target for a
training image is the expert with the largest ESTIMATED l2 radius: each
expert votes on ``label_samples`` draws of its own noise, ``p = (hits + 1/2) /
(samples + 1)`` for the true label, and the score is the expert's radius at
``p`` (or ``p - 1`` when ``p <= 1/2``, so that a wrong image goes to the expert
that is closest to right). The selector (the experts' architecture, its first
``K`` logits) is then trained by cross-entropy on inputs under its own Gaussian
noise ``sigma``, the noise it is certified with. None of this needs to be
optimal for soundness: the certificate holds for any selector.

Writes ``<out>/final.pt`` (a ``ucan train`` checkpoint: the selector's
weights, its noise, the experts' paths and SHA-256 digests, the alpha share)
and ``<out>/dual.json`` (the options, the label counts, versions).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..core.noises import Gaussian
from ..core.sequential import radius_at
from ..core.smooth import Smooth
from ..core.streams import resolve_generator
from ..data import load_dataset
from ..fileio import atomic_write_text, file_sha256
from ..models import build_model, save_checkpoint
from ..npg.dual import DUAL_KIND, FirstLogits
from ..runs import DualRun, load_trained
from .checkpoints import versions


def selector_targets(experts, images: torch.Tensor, labels: torch.Tensor, samples: int, generator,
                     batch_size: int = 1000, progress: bool = False) -> torch.Tensor:
    """The index of the expert with the largest estimated l2 radius for each image (module docstring)."""
    shape = tuple(images.shape[1:])
    step = max(1, batch_size // samples)  # images per forward batch
    scores = torch.empty(len(images), len(experts))
    for k, expert in enumerate(experts):
        # the score depends on the hit count only: one table of samples + 1 entries per expert
        p = [(hits + 0.5) / (samples + 1) for hits in range(samples + 1)]
        table = torch.tensor([radius_at(expert.noise, value, 2, shape) if value > 0.5 else value - 1 for value in p])
        device = next(expert.model.parameters()).device
        for start in tqdm(range(0, len(images), step), desc=f"expert {k} votes", disable=not progress, leave=False):
            xs = images[start:start + step]
            votes = expert.count_votes(xs.to(device), samples, batch_size, generator)
            scores[start:start + len(xs), k] = table[votes[torch.arange(len(xs)), labels[start:start + len(xs)]]]
    return scores.argmax(dim=1)


def train_dual(experts_paths, out, *, sigma: float = 0.5, share: float = 0.5, epochs: int = 3,
               max_train: int | None = None, label_samples: int = 32, batch_size: int = 128, lr: float = 1e-3,
               seed: int = 0, device=None, progress: bool = True, data_root=None) -> Path:
    """Train the selector over the experts ``experts_paths`` (``ucan train`` runs with fixed noise);
    return the path of the dual run's checkpoint."""
    if len(experts_paths) < 2:
        raise ValueError(f"a dual run needs at least 2 experts, got {len(experts_paths)}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"--sigma (the selector's Gaussian level) must be finite and > 0, got {sigma}")
    if not (0 < share < 1):
        raise ValueError(f"--share (the selector's part of alpha) must be in (0, 1), got {share}")
    for name, value in (("epochs", epochs), ("label-samples", label_samples), ("batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    runs = [load_trained(path) for path in experts_paths]
    first = runs[0]
    for path, run in zip(experts_paths, runs):
        if run.input_dependent or run.elastic or run.shift is not None or isinstance(run, DualRun):
            raise ValueError(f"expert {str(path)!r} is not a fixed-noise classifier run: {run.description()}")
        if (run.meta["model_name"], run.meta["dataset"]) != (first.meta["model_name"], first.meta["dataset"]):
            raise ValueError(f"experts differ: {experts_paths[0]!r} is a {first.meta['model_name']} on "
                             f"{first.meta['dataset']}, {str(path)!r} a {run.meta['model_name']} on {run.meta['dataset']}")
    if len(runs) > first.num_classes:
        raise ValueError(f"at most {first.num_classes} experts (the selector is a {first.meta['model_name']} "
                         f"with {first.num_classes} outputs), got {len(runs)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = resolve_generator(seed, device)
    experts = [run.smoothed(device) for run in runs]
    images, labels = load_dataset(first.meta["dataset"], "train", data_root).tensors()
    if max_train is not None:
        images, labels = images[:max_train], labels[:max_train]
    start = time.perf_counter()
    targets = selector_targets(experts, images, labels, label_samples, generator, progress=progress)
    counts = torch.bincount(targets, minlength=len(runs)).tolist()

    net = build_model(first.meta["model_name"]).to(device)
    selector = FirstLogits(net, len(runs))
    optimiser = torch.optim.Adam(selector.parameters(), lr=lr)
    loss_fn, noise = nn.CrossEntropyLoss(), Gaussian(sigma)
    order_rng = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        selector.train()
        order, total, right = torch.randperm(len(images), generator=order_rng), 0.0, 0
        for begin in tqdm(range(0, len(images), batch_size), desc=f"selector epoch {epoch}", disable=not progress,
                          leave=False):
            chosen = order[begin:begin + batch_size]
            xs, ys = images[chosen].to(device), targets[chosen].to(device)
            logits = selector(xs + noise.sample(xs.shape, generator=generator, device=device, dtype=xs.dtype))
            loss = loss_fn(logits, ys)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(chosen)
            right += int((logits.argmax(1) == ys).sum())
        history.append({"epoch": epoch, "loss": total / len(images), "noisy_accuracy": right / len(images)})
    selector.eval()
    experts_record = [{"path": str(Path(path).resolve()), "checkpoint": str(run.meta["path"]),
                       "sha256": file_sha256(run.meta["path"]), "noise": run.base_noise.describe()}
                      for path, run in zip(experts_paths, runs)]
    record = {"kind": DUAL_KIND, "experts": experts_record, "selector_noise": noise.describe(), "share": share,
              "options": {"epochs": epochs, "max_train": max_train, "label_samples": label_samples,
                          "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(device)},
              "target_counts": counts, "history": history, "seconds": time.perf_counter() - start,
              "versions": versions()}
    checkpoint = out / "final.pt"
    save_checkpoint(checkpoint, net, model_name=first.meta["model_name"], dataset=first.meta["dataset"],
                    extra={"noise": noise.describe(), "dual": {k: v for k, v in record.items() if k != "versions"}})
    atomic_write_text(out / "dual.json", json.dumps(record, indent=2) + "\n")
    return checkpoint
