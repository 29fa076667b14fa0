"""The shape of the package: no import cycle, no module that imports the CLI or the package
root, and ``import surgeon`` costs neither timm nor (before a name is used) torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "surgeon"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> list[str]:
    """Every ``surgeon`` module ``path`` imports, at module level or inside functions
    (lazy imports count: they only hide a cycle), except under ``if TYPE_CHECKING``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.split(".")[0] == "surgeon")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "surgeon":
                return
            for alias in node.names:  # `from . import passes` imports a submodule
                sub = f"{mod}.{alias.name}"
                found.append(
                    sub
                    if _is_package(sub) or (ROOT.parent / f"{sub.replace('.', '/')}.py").is_file()
                    else mod
                )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if m != name}
    return graph


def test_no_import_cycle() -> None:
    graph = _graph()
    # a package's __init__ importing its own submodules is not a cycle of the code
    edges = {
        m: {d for d in deps if not (m == d.rpartition(".")[0] and _is_package(m))}
        for m, deps in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if d not in edges:
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m)


def test_no_module_imports_the_cli_or_the_package_root() -> None:
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        if name == "surgeon.__main__":  # `python -m surgeon` is the CLI's entry point
            continue
        text = path.read_text()
        assert "surgeon_cli" not in text, f"{name} imports the CLI layer"
        if name != "surgeon":
            assert "surgeon" not in _imports(path), f"{name} imports the package root"


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip()


def test_import_surgeon_leaves_timm_and_torch_out() -> None:
    loaded = _run("import sys, surgeon; print(sorted({'timm', 'torch'} & set(sys.modules)))")
    assert loaded == "[]"


def test_the_core_needs_timm_only_for_timm_models() -> None:
    code = (
        "import sys, surgeon\n"
        "import surgeon.io, surgeon.passes, surgeon.discover\n"
        "print('timm' in sys.modules)"
    )
    assert _run(code) == "False"
