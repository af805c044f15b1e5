"""Clean accuracy of a run's smoothed classifier: Cohen's PREDICT on the first N test images.

    python scripts/smoothed_accuracy.py RUN_DIR [N=500] [n=1000] [alpha=0.001]

Prints one JSON line: accuracy (an abstention counts as wrong), abstention and error rates.
"""

import json
import sys
import time

import torch

from ucan_smoothing import ABSTAIN, Smooth
from ucan_smoothing.data import load_dataset
from ucan_smoothing.runs import load_trained


def main(run_dir, count=500, n=1000, alpha=0.001):
    count, n, alpha = int(count), int(n), float(alpha)
    run = load_trained(run_dir)
    smooth = Smooth(run.model, run.num_classes, run.noise(), input_shape=run.input_shape)
    images, labels = load_dataset(run.meta["dataset"], "test").tensors()
    images, labels = images[:count], labels[:count]
    start = time.time()
    predictions = []
    for i in range(0, count, 20):  # 20 images share each forward batch
        predictions += smooth.predict_batch(images[i:i + 20], n=n, alpha=alpha, batch_size=2000, generator=1000 + i)
    predictions = torch.tensor(predictions)
    print(json.dumps({
        "run": run_dir, "images": count, "n": n, "alpha": alpha,
        "smoothed_accuracy": float((predictions == labels).float().mean()),
        "abstain": float((predictions == ABSTAIN).float().mean()),
        "wrong": float(((predictions != labels) & (predictions != ABSTAIN)).float().mean()),
        "seconds": round(time.time() - start, 1), "noise": repr(run.noise()),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
