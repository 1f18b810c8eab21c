"""The architecture as a rule: sinkquant's modules form layers (README, "Layout"), and every import points down
the list or sideways within a layer, without cycles. Imports are read from the source (module level, under
TYPE_CHECKING, and inside functions alike), so a new upward arrow or cycle fails here whichever way it is
written."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sinkquant"

# Bottom to top. A module belongs to the layer of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("sinkquant.errors", "sinkquant.io", "sinkquant.tables", "sinkquant.memory", "sinkquant.hub")),
    ("models and data", ("sinkquant.adapters", "sinkquant.zoo", "sinkquant.online_transforms", "sinkquant.models",
                         "sinkquant.data", "sinkquant.perplexity")),
    ("quant", ("sinkquant.quant",)),
    ("profiling", ("sinkquant.profiling",)),
    ("backends", ("sinkquant.backends",)),
    ("steps", ("sinkquant.steps", "sinkquant.recipe")),
    ("engine", ("sinkquant.engine",)),
    ("exporters", ("sinkquant.backends.export",)),
    ("search", ("sinkquant.search",)),
    ("comparison", ("sinkquant.comparison", "sinkquant.regression", "sinkquant.harness")),
    ("interfaces", ("sinkquant.cli", "sinkquant.pytest_plugin", "sinkquant")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer; add it to LAYERS (and to the README's layout)"
    return max(matches)[1]


def imports(module: str, source: str | None = None) -> set[str]:
    """The sinkquant modules `module` imports (its file, or `source`), wherever the import statement stands."""
    path = MODULES.get(module, PACKAGE / "_")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("sinkquant") and name != module:
                found.add(name)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_down():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in GRAPH.items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "imports that point up the layer list:\n" + "\n".join(upward)


def test_no_import_cycles():
    """Depth-first search over every import (a package's __init__ counts as a module of its own)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("source", ["from sinkquant.engine.apply import apply_recipe",
                                    "import sinkquant.cli.args as args", "from ..search import auto"])
def test_an_upward_import_is_found(source):
    """The reader sees an import inside a function (relative or absolute) as well as at the top of a module."""
    module = "sinkquant.quant.probe"
    targets = imports(module, f"def f():\n    {source}\n")
    assert targets and all(layer_of(t) > layer_of(module) for t in targets)
