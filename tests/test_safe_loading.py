"""Loading user-given files never runs code from them.

* a scan of the package and scripts/: every ``torch.load`` passes
  ``weights_only=True``, no ``pickle.load``/``loads``/``Unpickler`` outside a
  restricted unpickler (one that overrides ``find_class``), no
  ``numpy.load(..., allow_pickle=True)``;
* CIFAR-10 batches load in their real format but a crafted pickle is refused
  before it runs anything;
* ``ucan attack`` says so when it takes a data folder from a sidecar.
"""

import ast
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from ucan_smoothing import data
from ucan_smoothing.cli import main
from ucan_smoothing.data import DataError, load_dataset

REPO = Path(__file__).resolve().parents[1]
SCANNED = sorted([*(REPO / "src" / "ucan_smoothing").rglob("*.py"), *(REPO / "scripts").glob("*.py")])

UNSAFE_PICKLE = {"pickle.load", "pickle.loads", "pickle.Unpickler",
                 "_pickle.load", "_pickle.loads", "_pickle.Unpickler"}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}
NUMPY_LOAD = {"numpy.load"}


# --------------------------------------------------------------------------- the scan


def _aliases(tree: ast.AST) -> dict:
    """Local name -> dotted name it stands for, from the module's imports."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict) -> str | None:
    """``np.load`` -> ``numpy.load`` (through the imports), None for anything not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def violations(source: str, filename: str = "<source>") -> list:
    """``file:line: what`` for every unsafe load in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    # Bases of restricted unpicklers: the one allowed use of pickle.Unpickler.
    allowed_bases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            restricted = any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
            for base in node.bases:
                if restricted and _dotted(base, aliases) in ("pickle.Unpickler", "_pickle.Unpickler"):
                    allowed_bases.add(id(base))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            if name in TORCH_LOAD and not _keyword_is(node, "weights_only", True):
                found.append(f"{filename}:{node.lineno}: {name}(...) without weights_only=True")
            if name in NUMPY_LOAD and any(k.arg in ("allow_pickle", None) for k in node.keywords) \
                    and not _keyword_is(node, "allow_pickle", False):
                found.append(f"{filename}:{node.lineno}: numpy.load(...) that may allow pickles")
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in allowed_bases \
                and isinstance(getattr(node, "ctx", None), ast.Load) and _dotted(node, aliases) in UNSAFE_PICKLE:
            found.append(f"{filename}:{node.lineno}: {_dotted(node, aliases)} (use a restricted unpickler)")
    return found


def test_the_scan_finds_every_kind_of_unsafe_load():
    assert violations("import torch\ntorch.load(f)") == ["<source>:2: torch.load(...) without weights_only=True"]
    assert violations("import torch\ntorch.load(f, weights_only=False)")
    assert violations("import torch as t\nt.load(f, **kw)")
    assert violations("from torch import load\nload(f, map_location='cpu')")
    assert violations("import torch\ntorch.load(f, weights_only=True)") == []
    assert violations("import pickle\npickle.load(f)")
    assert violations("import pickle as p\nx = p.loads(b)")
    assert violations("from pickle import load\nload(f)")
    assert violations("import pickle\nreader = pickle.load")  # not only calls
    assert violations("import pickle\nclass U(pickle.Unpickler):\n    pass")  # no find_class
    assert violations("import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
                      "        raise ValueError(n)\nU(f).load()") == []
    assert violations("import pickle\npickle.dump(x, f)") == []
    assert violations("import numpy as np\nnp.load(f, allow_pickle=True)")
    assert violations("import numpy as np\nnp.load(f, allow_pickle=flag)")
    assert violations("import numpy as np\nnp.load(f)\nnp.load(f, allow_pickle=False)") == []


def test_no_unsafe_load_in_the_package_or_scripts():
    assert len(SCANNED) > 20 and any(p.name == "data.py" for p in SCANNED)
    found = [v for path in SCANNED for v in violations(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert found == [], "\n".join(found)


# --------------------------------------------------------------------------- CIFAR-10 batches


def _batch(labels=(3, 0, 9)) -> dict:
    """A test batch in the format of the official python version (a dict of bytes keys)."""
    rng = np.random.default_rng(0)
    return {b"batch_label": b"testing batch 1 of 1", b"labels": list(labels),
            b"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8),
            b"filenames": [f"image_{i}.png".encode() for i in range(len(labels))]}


def _cifar_folder(tmp_path, raw: bytes) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(raw)
    return tmp_path


def _assert_loads_as(root, batch):
    test = load_dataset("cifar10", "test", root)
    assert np.array_equal(test.images.numpy().reshape(-1, 3072), batch[b"data"])
    assert test.labels.tolist() == [int(label) for label in batch[b"labels"]]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_of_every_protocol_load(tmp_path, protocol):
    batch = _batch()
    _assert_loads_as(_cifar_folder(tmp_path, pickle.dumps(batch, protocol=protocol)), batch)


def test_cifar_batches_of_python2_numpy_and_numpy_scalars_load(tmp_path):
    # The official files name numpy.core.multiarray (numpy 2 calls it numpy._core);
    # labels may be numpy integers (numpy.core.multiarray.scalar).
    batch = _batch(labels=[np.int64(3), np.uint8(0), np.int32(9)])
    raw = pickle.dumps(batch, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"multiarray\nscalar" in raw
    _assert_loads_as(_cifar_folder(tmp_path, raw), batch)


class _RunsCode:
    """Unpickling this calls ``function(*args)``: how a crafted pickle runs code."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("how", ["os.system", "exec"])
def test_a_crafted_cifar_batch_is_refused_before_it_runs(tmp_path, how):
    marker = tmp_path / "ran"
    if how == "os.system":
        payload, refused = _RunsCode(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"
    else:  # protocol 2 writes Python 2's name, __builtin__
        payload, refused = _RunsCode(exec, f"open({str(marker)!r}, 'w').close()"), "__builtin__.exec"
    batch = _batch()
    batch[b"filenames"] = [payload]  # otherwise a well-formed batch
    raw = pickle.dumps(batch, protocol=2)
    root = _cifar_folder(tmp_path, raw)
    with pytest.raises(DataError, match=rf"test_batch.*{refused}.*refused, nothing in it was run"):
        load_dataset("cifar10", "test", root)
    assert not marker.exists()
    pickle.loads(raw)  # the check of the test: plain unpickling does run it
    assert marker.exists()


def test_a_cifar_batch_asking_for_another_codec_is_refused(tmp_path):
    import codecs

    batch = _batch()
    batch[b"batch_label"] = _RunsCode(codecs.encode, "text", "rot13")
    with pytest.raises(DataError, match="test_batch.*'rot13'"):
        load_dataset("cifar10", "test", _cifar_folder(tmp_path, pickle.dumps(batch, protocol=2)))


# --------------------------------------------------------------------------- data folders from sidecars


def _certify_file(tmp_path, data_root) -> Path:
    from ucan_smoothing.results import ResultWriter

    results = tmp_path / "r.tsv"
    config = {"checkpoint": str(tmp_path / "absent.pt"), "dataset": "cifar10", "split": "test",
              "data_root": data_root}
    with ResultWriter(results, config):
        pass
    return results


def test_attack_says_when_it_takes_the_data_folder_from_the_sidecar(tmp_path, capsys):
    crafted = tmp_path / "elsewhere"
    results = _certify_file(tmp_path, str(crafted))
    # The run is absent: the command stops with exit status 2 after reading the sidecar.
    assert main(["attack", str(results), "--out", str(tmp_path / "a.tsv")]) == 2
    err = capsys.readouterr().err
    assert (f"ucan attack: reading data from {crafted} (data_root recorded in {results}.json; "
            "pass --data-root to choose)") in err
    assert main(["attack", str(results), "--out", str(tmp_path / "a.tsv"), "--data-root", str(tmp_path)]) == 2
    assert "reading data from" not in capsys.readouterr().err
    no_root = _certify_file(tmp_path / "default", None)
    assert main(["attack", str(no_root), "--out", str(tmp_path / "b.tsv")]) == 2
    assert "reading data from" not in capsys.readouterr().err
