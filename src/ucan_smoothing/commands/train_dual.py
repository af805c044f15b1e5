"""Train the selector of a dual-smoothing run: a per-input choice of noise that stays sound.

``ucan train-dual EXPERT EXPERT ... --sigma 0.5 --out runs/dual`` takes two or
more ``ucan train`` runs with FIXED noise (isotropic levels, or pattern-fixed
/ universal anisotropic noise) and trains a selector network that sends each
input to the expert expected to certify it at the largest l2 radius. The
selector is smoothed with its own Gaussian noise (``--sigma``) and certified
too, so ``ucan certify runs/dual`` gives proven certificates: the radius is
the smaller of the expert's and the selector's (proof in
:mod:`ucan_smoothing.npg.dual`, docs/adaptive.md). ``--share`` is the part of
``alpha`` the selector's certificate spends.
"""

from __future__ import annotations

import argparse

from ..training.dual import train_dual


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  ucan train-dual runs/mnist-g025 runs/mnist-g050 runs/mnist-g100 --sigma 0.5 "
                     "--out runs/mnist-dual\n  ucan certify runs/mnist-dual --out results/dual.tsv --n 10000")
    parser.add_argument("experts", nargs="+", help="run folders or checkpoints of the experts (fixed noise), in "
                        "menu order")
    parser.add_argument("--out", required=True, help="folder of the dual run (final.pt, dual.json)")
    parser.add_argument("--sigma", type=float, default=0.5, help="Gaussian level of the selector's own noise")
    parser.add_argument("--share", type=float, default=0.5, help="part of alpha spent on the selector's certificate")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the selector")
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--label-samples", type=int, default=32,
                        help="noise draws per expert and image to choose each image's target expert")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the targets' noise, the order and the training noise")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--data-root", default=None, help="data folder (MNIST/Fashion-MNIST have defaults)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args) -> int:
    checkpoint = train_dual(args.experts, args.out, sigma=args.sigma, share=args.share, epochs=args.epochs,
                            max_train=args.max_train, label_samples=args.label_samples, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, device=args.device, progress=args.progress,
                            data_root=args.data_root)
    print(f"wrote {checkpoint} (dual run: certify it with ucan certify {checkpoint.parent})")
    return 0
