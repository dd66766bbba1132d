"""The import graph keeps the layering the README draws: no module imports itself back through others, and
every import between packages points down the stack. Read from the source with ``ast`` (imports inside
functions count too: a lazy import that points up is still a circle, only hidden)."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "dlm"

# Lower numbers are lower in the stack; an import may only go to a lower layer (or within its own package).
LAYERS: dict[str, int] = {
    "dlm.errors": 0,
    "dlm.sections": 0,
    "dlm.lazy": 0,
    "dlm.kernels": 1,
    "dlm.data_streams": 2,
    "dlm.modeling": 3,
    "dlm.generation": 4,
    "dlm.evaluation": 5,
    "dlm.config": 5,
    "dlm.training": 6,
    "dlm.launcher": 7,
    "dlm.cli": 8,
    "dlm": 8,
}
# Each package's config section lives beside it and sits just below the assembly in dlm.config.
SECTION_MODULES = {
    "dlm.modeling.config": 3,
    "dlm.modeling.section": 3,
    "dlm.data_streams.config": 2,
    "dlm.training.config": 4.5,
    "dlm.launcher.config": 4.5,
}


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = file
    return out


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else ""

    edges: dict[str, set[str]] = {}
    for name, file in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names if alias.name.startswith("dlm")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlm") and not node.level:
                targets |= {owner(f"{node.module}.{alias.name}") for alias in node.names}
        edges[name] = targets - {name, ""}
    return edges


def _layer(module: str) -> float:
    if module in SECTION_MODULES:
        return SECTION_MODULES[module]
    top = ".".join(module.split(".")[:2])
    return LAYERS[top]


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycles() -> None:
    modules = _modules()
    edges = _edges(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    real = [c for c in cycles if not _through_own_init(c)]
    assert not real, f"import cycles: {real}"


def _through_own_init(cycle: list[str]) -> bool:
    """A package's ``__init__`` re-exporting modules that import names back from it: one package's public
    surface, not a circle between components."""
    package = _package(cycle[0])
    return package in cycle and all(_package(m) == package for m in cycle)


def test_imports_point_down_the_stack() -> None:
    modules = _modules()
    assert set(map(_package, modules)) <= set(LAYERS), "a new top-level package needs a layer in LAYERS"
    up = [
        f"{source} -> {target}"
        for source, targets in _edges(modules).items()
        for target in targets
        if _package(source) != _package(target) and _layer(target) >= _layer(source) and source != "dlm"
    ]
    assert not up, "imports that point sideways or up: " + ", ".join(sorted(up))


def test_nothing_imports_the_cli_and_sections_import_only_below_the_assembly() -> None:
    edges = _edges(_modules())
    assert not [s for s, t in edges.items() if "dlm.cli" in t]
    for section in SECTION_MODULES:
        if section in edges:
            assert "dlm.config" not in edges[section], f"{section} imports the assembly that imports it"
