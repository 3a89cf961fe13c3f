"""Imports run one way: cli → adapter → pipeline → the shared modules at the package root.

Inside adapter/ the sub-packages are layered too: model → training → baselines → evaluation →
experiments (a module imports its own layer and those below it). Every import in every module is
checked, including imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own rank or lower.
LAYERS = [
    ("shared", ["rankpipe", "rankpipe.errors", "rankpipe.settings", "rankpipe.files", "rankpipe.devices",
                "rankpipe.templates"]),
    ("pipeline", ["rankpipe.pipeline"]),
    ("adapter", ["rankpipe.adapter"]),
    ("adapter.model", ["rankpipe.adapter.model"]),
    ("adapter.training", ["rankpipe.adapter.training"]),
    ("adapter.baselines", ["rankpipe.adapter.baselines"]),
    ("adapter.evaluation", ["rankpipe.adapter.evaluation"]),
    ("adapter.experiments", ["rankpipe.adapter.experiments"]),
    ("benchmarks", ["rankpipe.benchmarks"]),
    ("cli", ["rankpipe.cli"]),
]


def rank_of(module: str) -> int:
    """The layer of a dotted module name: the most specific prefix that matches."""
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix if prefix == "rankpipe" else module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} belongs to no layer; add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("rankpipe", *parts))


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every rankpipe import in a file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            # `from rankpipe.adapter import ADAPTER_METHOD` imports the package itself.
            out.append((node.lineno, name))
    return [(line, name) for line, name in out if name == "rankpipe" or name.startswith("rankpipe.")]


SOURCES = sorted(
    p for p in ROOT.rglob("*.py")
    if p.relative_to(ROOT).parts[0] not in ("tests", "build", "dist") and not p.relative_to(ROOT).parts[0].startswith(".")
)


def test_every_module_belongs_to_a_layer():
    assert SOURCES, "no modules found"
    for path in SOURCES:
        rank_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_it(path: Path):
    module = module_name(path)
    own = rank_of(module)
    upward = [
        f"line {line}: {name} ({LAYERS[rank_of(name)][0]})"
        for line, name in imported_modules(path, module)
        if rank_of(name) > own
    ]
    assert not upward, f"{module} ({LAYERS[own][0]}) imports from a layer above it: {'; '.join(upward)}"


def test_the_check_catches_an_upward_import(tmp_path: Path):
    """The walker sees an import inside a function, the way a lazy upward import would hide."""
    fake = ROOT / "pipeline" / "store.py"
    source = tmp_path / "store.py"
    source.write_text("def f():\n    from rankpipe.adapter.training.loop import train_from_store\n")
    names = [name for _, name in imported_modules(source, module_name(fake))]
    assert names == ["rankpipe.adapter.training.loop"]
    assert rank_of(names[0]) > rank_of(module_name(fake))
