"""Figures that runs write beside their weights (sigma maps); the analysis plots build on the same matplotlib set-up."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from .fileio import atomic_write_bytes


def save_sigma_png(path: str | os.PathLike, sigma: torch.Tensor, mu: torch.Tensor | None = None,
                   title: str = "", images: torch.Tensor | None = None) -> None:
    """Save a sigma map (and mu, when non-zero) as a PNG: one panel per channel, colour bars.

    ``sigma`` is ``(C, H, W)`` (a fixed NPG) or ``(B, C, H, W)`` for a few
    images of an input-dependent NPG (then ``images`` are shown beside them).
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    sigma = sigma.detach().float().cpu()
    mu = None if mu is None else mu.detach().float().cpu()
    if sigma.dim() == 3:
        sigma, mu = sigma[None], None if mu is None else mu[None]
        images = None
    show_mu = mu is not None and bool(mu.abs().max() > 0)
    channels = sigma.shape[1]
    offset = int(images is not None)
    columns = offset + channels * (1 + show_mu)
    rows = sigma.shape[0]
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(max(3.4 * columns, 5.4), 3.1 * rows + 0.7))
    for item in range(rows):
        if images is not None:
            image = images[item].detach().float().cpu()
            ax = axes[item, 0]
            ax.imshow((image[0] if image.shape[0] == 1 else image.permute(1, 2, 0).clamp(0, 1)).numpy(), cmap="gray")
            ax.set_title(f"input {item}")
            ax.axis("off")
        panels = [("sigma", c, sigma[item, c], "viridis") for c in range(channels)]
        if show_mu:
            panels += [("mu", c, mu[item, c], "coolwarm") for c in range(channels)]
        for column, (name, c, values, cmap) in enumerate(panels, start=offset):
            ax = axes[item, column]
            kwargs, scale_note = {}, ""
            if name == "mu":
                bound = float(values.abs().max()) or 1.0
                kwargs = dict(vmin=-bound, vmax=bound)
            elif float(values.max()) > 20 * float(values.min()):
                # A wide range (a learnt sigma often spans exp(-gamma)..exp(gamma)): log colours.
                kwargs = dict(norm=LogNorm(vmin=float(values.min()), vmax=float(values.max())))
                scale_note = " (log colours)"
            shown = ax.imshow(values.numpy(), cmap=cmap, **kwargs)
            ax.set_title(f"{name}" + (f" channel {c}" if channels > 1 else "") + scale_note
                         + f"\nmin {float(values.min()):.3g}, max {float(values.max()):.3g}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
