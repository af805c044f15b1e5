#!/usr/bin/env bash
# Issue 4's check: the Gaussian(0.25) MNIST CNN, a universal NPG and the three
# pattern-fixed NPGs trained from it, then the smoothed accuracy of each.
set -euxo pipefail
cd "$(dirname "$0")/.."
U=.venv/bin/ucan
$U train classifier --model mnist_cnn --noise gaussian --scale 0.25 --epochs 10 --seed 0 --out runs/mnist-gaussian0.25
$U train npg --kind universal --base runs/mnist-gaussian0.25/final.pt --epochs 3 --out runs/mnist-g0.25-universal
for p in 1 2 inf; do
  $U train npg --kind pattern --p $p --kappa 0.01 --iota 1 --joint --base runs/mnist-gaussian0.25/final.pt --epochs 3 --out runs/mnist-g0.25-pattern-l$p
done
for r in mnist-gaussian0.25 mnist-g0.25-universal mnist-g0.25-pattern-l1 mnist-g0.25-pattern-l2 mnist-g0.25-pattern-linf; do
  .venv/bin/python scripts/smoothed_accuracy.py runs/$r 500 1000 0.001
done
