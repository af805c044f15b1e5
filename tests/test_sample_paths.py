"""CIFAR-10 and ImageNet end to end through the same commands as MNIST, on real images.

The 20 CIFAR-10 PNGs and 20 ImageNet JPEGs shipped in the ``foolbox`` wheel are
written into the STANDARD on-disk formats (a ``cifar-10-batches-py`` folder of
pickled batches; an ImageFolder ``train/`` + ``val/`` tree), then
``ucan train classifier`` (resnet20 / resnet50), ``ucan certify --split foolbox``
and, on CIFAR-10, a pattern-fixed NPG (``ucan train npg --kind pattern``, a
3-channel sigma) run through ``ucan_smoothing.cli.main`` exactly as a user
would type them. Everything is tiny (one epoch on 20 or 4 images, n = 20
noise samples): what is tested is that the paths work, not accuracy.
"""

import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from ucan_smoothing import data
from ucan_smoothing.cli import main
from ucan_smoothing.results import read_results

HAS_FOOLBOX = data.has_wheel_data("foolbox")
pytestmark = pytest.mark.skipif(not HAS_FOOLBOX, reason="wheel foolbox not installed (pip install --no-deps "
                                                         "foolbox==3.3.4)")


@pytest.fixture(autouse=True)
def one_thread():
    """A single torch thread: the tests stay cheap on a shared machine (training passes --threads 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def foolbox_files(prefix: str) -> list:
    """(index, label, path) of the foolbox wheel's ``<prefix>_<index>_<label>.<ext>`` files, in index order."""
    pattern = re.compile(rf"^{prefix}_(\d+)_(\d+)\.(png|jpe?g)$", re.IGNORECASE)
    folder = data.foolbox_data_dir()
    found = sorted((int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := pattern.match(p.name)))
    assert len(found) == 20, f"expected 20 {prefix} images in {folder}, found {len(found)}"
    return found


# --------------------------------------------------------------------------- standard on-disk formats


def write_cifar_folder(root) -> tuple:
    """``root/cifar-10-batches-py`` as the official python version: data_batch_1..5 (4 images each)
    and test_batch (all 20), pickled dicts with b'data' (N x 3072 uint8, channel-major) and b'labels'."""
    from PIL import Image

    files = foolbox_files("cifar10")
    images, labels = [], []
    for _, label, path in files:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
        assert array.shape == (32, 32, 3)
        images.append(array.transpose(2, 0, 1).reshape(3072))
        labels.append(label)
    images = np.stack(images)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, rows):
        batch = {b"batch_label": name.encode(), b"labels": [labels[i] for i in rows],
                 b"data": images[rows], b"filenames": [files[i][2].name.encode() for i in rows]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for b in range(5):
        dump(f"data_batch_{b + 1}", list(range(4 * b, 4 * b + 4)))
    dump("test_batch", list(range(20)))
    return folder, labels


def write_imagenet_folder(root, train_count: int = 20) -> list:
    """``root/train/<class>/`` and ``root/val/<class>/`` with the JPEGs.

    The class folders are the 1000 label numbers, zero-padded (``0000`` ...
    ``0999``), all present (most empty), so that sorted folder order = the
    ImageNet class index, as with the WordNet ids of the real tree.
    """
    files = foolbox_files("imagenet")
    for split, chosen in (("train", files[:train_count]), ("val", files)):
        for label in range(1000):
            (root / split / f"{label:04d}").mkdir(parents=True)
        for index, label, path in chosen:
            shutil.copy(path, root / split / f"{label:04d}" / f"ILSVRC_{split}_{index:08d}.JPEG")
    return [label for _, label, _ in files]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    folder, labels = write_cifar_folder(root)
    return root, folder, labels


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, write_imagenet_folder(root, train_count=4)


# --------------------------------------------------------------------------- helpers


CERTIFY = ["--n0", "10", "--n", "20", "--max", "3", "--batch-size", "20"]


def train_args(target, model, dataset, root, out, *extra):
    return ["train", target, "--model", model, "--dataset", dataset, "--data-root", str(root), "--epochs", "1",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]


def certify(run, out, *extra):
    assert main(["certify", str(run), "--out", str(out), "--no-progress", *extra]) == 0
    return read_results(out)


def check_rows(rows, labels, npg="none"):
    for row in rows:
        assert row["label"] == labels[row["idx"]], "certify read another label than the foolbox file name's"
        assert row["is_certificate"] is True
        assert row["noise"] == "gaussian:0.25" and row["npg"] == npg
        assert row["correct"] == int(row["predict"] == row["label"])
        assert row["predict"] == -1 or row["radius"] >= 0


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_folder_reads_back_as_the_foolbox_samples(cifar):
    root, folder, labels = cifar
    samples = data.load_dataset("cifar10", "foolbox")
    test = data.load_dataset("cifar10", "test", root)  # the folder holding cifar-10-batches-py
    assert torch.equal(test.images, samples.images) and test.labels.tolist() == labels == samples.labels.tolist()
    train = data.load_dataset("cifar10", "train", folder)  # or the batches folder itself
    assert len(train) == 20 and torch.equal(train.images, samples.images)


def train_and_certify_samples(model, dataset, root, run, labels, images: str, batch: str) -> list:
    """``ucan train classifier`` on the first ``images`` images, then certify the first foolbox samples."""
    assert main(train_args("classifier", model, dataset, root, run,
                           "--max-train", images, "--max-test", images, "--batch-size", batch)) == 0
    assert (run / "final.pt").is_file() and (run / "metrics.csv").is_file()
    rows = certify(run, run.parent / f"{model}_foolbox.tsv", "--split", "foolbox", *CERTIFY)
    assert [row["idx"] for row in rows] == [0, 1, 2]
    check_rows(rows, labels)
    return rows


def test_cifar10_resnet20_train_certify_and_pattern_npg(cifar, tmp_path):
    root, _, labels = cifar
    run = tmp_path / "resnet20"
    rows = train_and_certify_samples("resnet20", "cifar10", root, run, labels, "20", "10")
    # The same images read from the on-disk test split give the same rows (noise is seeded per image).
    rows_disk = certify(run, tmp_path / "disk.tsv", "--split", "test", "--data-root", str(root), *CERTIFY)
    assert without_time(rows_disk) == without_time(rows)

    # A pattern-fixed NPG on the trained resnet20: sigma is one (3, 32, 32) map shared by the channels.
    npg = tmp_path / "pattern"
    assert main(train_args("npg", "resnet20", "cifar10", root, npg, "--kind", "pattern", "--p", "2",
                           "--train-pattern", "--base", str(run / "final.pt"),
                           "--max-train", "20", "--max-test", "20", "--batch-size", "10")) == 0
    sigma = torch.load(npg / "sigma.pt")
    assert sigma.shape == (3, 32, 32) and torch.equal(sigma[0], sigma[1]) and torch.equal(sigma[0], sigma[2])
    assert not torch.allclose(sigma, sigma.mean())  # not isotropic
    rows = certify(npg, tmp_path / "pattern.tsv", "--split", "foolbox", *CERTIFY)
    assert [row["idx"] for row in rows] == [0, 1, 2]
    check_rows(rows, labels, npg="pattern:p=2")


# --------------------------------------------------------------------------- ImageNet


def test_imagenet_folder_reads_back_as_the_foolbox_samples(imagenet):
    root, labels = imagenet
    samples = data.load_dataset("imagenet", "foolbox")
    val = data.load_dataset("imagenet", "test", root)  # val/ with the ImageNet protocol: resize 256, crop 224
    assert len(val.classes) == 1000 and len(val) == 20 and samples.labels.tolist() == labels
    # ImageFolder order is by class; the file name gives the foolbox index.
    for position, (path, label) in enumerate(val.samples):
        index = int(path.stem.rsplit("_", 1)[1])
        assert label == labels[index]
        if position in (0, 19):
            assert torch.equal(val[position][0], samples[index][0])
    train = data.load_dataset("imagenet", "train", root)
    assert len(train) == 4 and sorted(train.labels.tolist()) == sorted(labels[:4])


def test_imagenet_resnet50_train_and_certify(imagenet, tmp_path):
    root, labels = imagenet
    run = tmp_path / "resnet50"
    train_and_certify_samples("resnet50", "imagenet", root, run, labels, "4", "2")
    # and from the on-disk val/ tree (ImageFolder order: by class), one image, few samples
    val = data.load_dataset("imagenet", "test", root)
    rows = certify(run, tmp_path / "disk.tsv", "--split", "test", "--data-root", str(root), "--n0", "4", "--n", "10",
                   "--max", "1", "--batch-size", "10")
    assert len(rows) == 1 and rows[0]["idx"] == 0 and rows[0]["label"] == int(val.labels[0])
    assert rows[0]["is_certificate"] is True
