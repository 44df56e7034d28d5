"""The package is a one-way stack: no module imports, even lazily, a module that imports it back;
and docs/architecture.md describes every module and folder of it, no more."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_mllmprobe"
ROOT = "pytest_mllmprobe"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in ``path`` (top level and inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from . import engine`` imports the submodule; ``from .data import Dataset`` the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert f"{ROOT}.engine" in graph[f"{ROOT}.plugin"]  # ``from . import engine`` inside a hook
    assert f"{ROOT}.data" in graph[f"{ROOT}.engine"]  # ``from .data import ...`` (the package)
    assert f"{ROOT}.errors" in graph[f"{ROOT}.models.stages"]  # ``from ..errors import ...``
    # and a planted circle is found
    planted = {**graph, f"{ROOT}.errors": graph[f"{ROOT}.errors"] | {f"{ROOT}.models.stages"}}
    assert [f"{ROOT}.errors", f"{ROOT}.models.stages"] in cycles(planted)


def test_no_import_circles() -> None:
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("engine_module", ["engine", "extract", "probes", "scoring", "verdicts", "models.load"])
def test_nothing_below_the_plugin_imports_pytest_or_the_plugin(engine_module: str) -> None:
    source = (PACKAGE / f"{engine_module.replace('.', '/')}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "pytest" not in names and "plugin" not in names and "items" not in names


ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def documented_modules() -> list[str]:
    """The first cell of each row of the module table in docs/architecture.md (``engine.py``, ``data/``)."""
    import re

    rows = re.findall(r"^\| `([^`]+)` \|", ARCHITECTURE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert rows, f"no module table in {ARCHITECTURE}"
    return rows


def package_entries() -> set[str]:
    """The modules and subpackages directly under pytest_mllmprobe/ (files inside folders are not listed)."""
    modules = {path.name for path in PACKAGE.glob("*.py")}
    folders = {f"{path.name}/" for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    return modules | folders


def test_the_architecture_page_names_every_module_and_only_those() -> None:
    documented = documented_modules()
    assert len(documented) == len(set(documented)), "a module has two rows in docs/architecture.md"
    actual = package_entries()
    missing = sorted(actual - set(documented))
    stale = sorted(set(documented) - actual)
    assert not missing, f"docs/architecture.md does not describe {missing}: add a row saying what each owns"
    assert not stale, f"docs/architecture.md describes {stale}, which pytest_mllmprobe/ does not have"
