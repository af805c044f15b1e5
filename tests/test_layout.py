"""The package layout shows the data flow (DESIGN.md section 9), and the import graph keeps it.

data -> model (+ NPG) -> Smooth -> certificate -> result row -> analysis: a module
imports only its own layer or the layers below it, the mathematics (``core``)
imports nothing outside itself, and the commands that certify do not load the
training code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ucan_smoothing

PACKAGE = Path(ucan_smoothing.__file__).parent
NAME = "ucan_smoothing"

#: layer of each top-level room, from the bottom up
LAYERS = {
    "fileio": 0, "core": 0, "distributed": 0, "allocator": 0,
    "data": 1, "models": 1, "published": 1, "results": 1, "figures": 1,
    "npg": 2,
    "runs": 3, "contract": 3,
    "attack": 4, "analysis": 4, "training": 4,
    "commands": 5, "cli": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module: str, top_level_only: bool = False) -> set:
    """The package modules that ``module`` imports (relative imports resolved)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != module}
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_map_covers_every_room():
    rooms = {room(m) for m in MODULES} - {""}
    assert rooms == set(LAYERS), f"rooms without a layer (or layers without a room): {rooms ^ set(LAYERS)}"


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module in MODULES:
        if module == NAME:
            continue
        for target in imports_of(module):
            if target != NAME and LAYERS[room(target)] > LAYERS[room(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_core_imports_nothing_outside_core():
    outside = [f"{m} -> {t}" for m in MODULES if room(m) == "core" for t in imports_of(m) if room(t) != "core"]
    assert not outside, outside


def test_results_import_only_leaf_modules():
    """Reading result files needs no torch: results imports only fileio and allocator (neither imports torch)."""
    outside = [f"{m} -> {t}" for m in MODULES if room(m) == "results"
               for t in imports_of(m) if room(t) not in ("results", "fileio", "allocator")]
    assert not outside, outside


def test_no_circle_of_module_level_imports():
    graph = {m: imports_of(m, top_level_only=True) - {NAME} for m in MODULES}
    # a package's __init__ re-exporting its own modules is not a circle of logic
    graph = {m: {t for t in targets if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, targets in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("command", ["certify", "attack", "analyze"])
def test_commands_that_certify_do_not_load_the_training_code(command):
    code = (f"import sys, ucan_smoothing.commands.{command}; "
            "print(sorted(m for m in sys.modules if m.startswith('ucan_smoothing.training')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_reading_results_imports_no_torch():
    code = "import sys, ucan_smoothing.results; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_public_api_unchanged():
    from ucan_smoothing import (  # noqa: F401  (the names the README and users import)
        ABSTAIN, FAMILIES, Anisotropic, Certificate, CertifiedRegion, ExpInf, Gaussian, Laplace, Noise, PowerLaw,
        Scaling, Smooth, Uniform, clopper_pearson_lower, clopper_pearson_upper, make_noise, min_samples_to_certify,
        parse_norm,
    )
    assert Smooth.__module__ == "ucan_smoothing.core.smooth"
    with pytest.raises(AttributeError):
        ucan_smoothing.no_such_name  # noqa: B018
