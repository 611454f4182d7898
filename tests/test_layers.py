"""Imports point down, and the tracking contract's names are spelled in one place.

The layers, each allowed to import only those below it that are listed in ALLOWED:

    commands   harness/commands/, harness/cli.py, harness/__main__.py: everything below
    studies    harness/studies/: train, store, data, foundation, models
    report     harness/report/: store, data, foundation -- it reads the tracking store, never the
               trainer (no torch, no models); data only for the dataset catalogue's names
    bench      harness/bench/: train (its loss and device), store, data, foundation, models
    train      harness/config.py, harness/train.py, harness/evaluate.py, harness/compiling.py: store,
               data, foundation, models
    store      harness/store/: foundation
    data       harness/data/: foundation
    foundation harness/errors.py, metrics.py, stats.py, pareto.py, allocator.py, checkpoints.py, writable.py,
               harness/__init__.py: leaf modules importing nothing from harness but the error base
               (the user-error base, metric definitions, significance tests, Pareto fronts, the CPU allocator
               setting, safe checkpoint files, the writable-folder probe)
    models     models/: nothing from harness/

studies and report are peers that do not import each other, and so are store and data. config.py
sits with train: it builds the training configuration and checks it against the model registry;
what stored runs need from it (settings added later) is in the store's contract. Every import
counts, including those inside functions (a deferred import still makes the module depend on
the other at run time). A module that fits no layer fails the test, so a new one gets placed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from harness.store import contract

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "models": set(),
    "foundation": set(),
    "store": {"foundation"},
    "data": {"foundation"},
    "train": {"store", "data", "foundation", "models"},
    "bench": {"train", "store", "data", "foundation", "models"},
    "report": {"store", "data", "foundation"},
    "studies": {"train", "store", "data", "foundation", "models"},
    "commands": {"studies", "report", "bench", "train", "store", "data", "foundation", "models"},
}

_LAYER_OF = [  # (module name or package prefix, layer), first match wins
    ("models", "models"),
    ("harness.commands", "commands"),
    ("harness.cli", "commands"),
    ("harness.__main__", "commands"),
    ("harness.studies", "studies"),
    ("harness.report", "report"),
    ("harness.bench", "bench"),
    ("harness.config", "train"),
    ("harness.train", "train"),
    ("harness.evaluate", "train"),
    ("harness.compiling", "train"),
    ("harness.store", "store"),
    ("harness.data", "data"),
    ("harness.errors", "foundation"),
    ("harness.metrics", "foundation"),
    ("harness.stats", "foundation"),
    ("harness.allocator", "foundation"),
    ("harness", "foundation"),
]


def layer_of(module: str) -> str | None:
    for prefix, layer in _LAYER_OF:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every source file of harness/ and models/ under `root`."""
    found = {}
    for package in ("harness", "models"):
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every harness/models import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from harness import stats` imports the module harness.stats
                candidate = f"{base}.{alias.name}"
                out.append((node.lineno, candidate if candidate in known else base))
    return [(line, name) for line, name in out if name.split(".")[0] in ("harness", "models")]


def violations(root: Path) -> list[str]:
    found = modules(root)
    problems = []
    for module, path in found.items():
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module}: in no layer (add it to tests/test_layers.py)")
            continue
        for line, target in imports(module, path, set(found)):
            other = layer_of(target)
            if other is None:
                problems.append(f"{path.relative_to(root)}:{line}: imports {target}, in no layer")
            elif other != layer and other not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(root)}:{line}: {layer} imports {target} ({other})")
    return problems


def test_no_module_imports_upward():
    assert violations(ROOT) == []


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    """The checker itself: a copy of the tree with the report importing the bench (torch, the
    trainer) inside a function, as it once did, fails."""
    for package in ("harness", "models"):
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    tables = tmp_path / "harness" / "report" / "tables.py"
    tables.write_text(tables.read_text() + "\n\ndef _bench():\n    from harness.bench import AXES\n    return AXES\n")
    problems = violations(tmp_path)
    assert len(problems) == 1 and "harness/report/tables.py" in problems[0]
    assert "report imports harness.bench (bench)" in problems[0]


def _string_literals(tree: ast.AST):
    """Every string constant that is not a docstring or other bare string statement."""
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare:
            yield node


def test_harness_names_are_spelled_only_in_the_contract():
    names = contract.harness_names()
    assert {"harness.kind", "harness.final_key", "harness.source_run_id"} <= names
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in sorted(names)) + r")(?!\w)")
    spelled = []
    for module, path in modules(ROOT).items():
        if module == "harness.store.contract":
            continue
        for node in _string_literals(ast.parse(path.read_text())):
            for match in pattern.finditer(node.value):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}: {match.group(1)}")
    assert spelled == [], "use the constant in harness/store/contract.py"


@pytest.mark.parametrize("store", sorted((ROOT / "reports").glob("*/store")), ids=lambda p: p.parent.name)
def test_committed_stores_are_written_in_the_contract(store):
    """The contract's names are on disk: every committed store's runs carry its run kind, and every
    final run its key, under the names the readers look for."""
    import json

    from harness.store import records
    from harness.store.reader import Store

    if records.is_records(store):  # read the records as they are, without loading them into MLflow
        tags = [json.loads(p.read_text())["tags"] for p in sorted(store.glob(f"{records.RUNS}/*/*.json"))]
    else:
        reader = Store(f"sqlite:///{store / 'mlflow.db'}")
        tags = [run.tags for run in reader.runs(reader.experiments())]
    kinds = {contract.KIND_TRAIN, contract.KIND_TRIAL, contract.KIND_FINAL, contract.KIND_STUDY, contract.KIND_BENCH}
    assert tags and {t.get(contract.KIND) for t in tags} <= kinds
    assert all(contract.FINAL_KEY in t for t in tags if t.get(contract.KIND) == contract.KIND_FINAL)
