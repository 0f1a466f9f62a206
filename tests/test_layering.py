"""The layers import only downward — prunevision (library) ← sweeps ← analysis ← prunevision_cli —
and no module imports itself back through others. Checked statically (every import statement,
module level or inside a function), and at run time for the library's promise not to load Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("prunevision", "sweeps", "analysis", "prunevision_cli")  # lowest first


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement in the file, relative ones resolved."""
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # `from pkg import module`
    return out


def import_graph(root: Path, layers: tuple[str, ...] = LAYERS) -> tuple[dict[str, set[str]], list[str]]:
    """Module → the project modules it imports, and every upward import as 'file:line: a imports b'."""
    files = {(_module_name(p, root)): p for layer in layers for p in sorted((root / layer).rglob("*.py"))}
    rank = {name: i for i, name in enumerate(layers)}
    graph: dict[str, set[str]] = {m: set() for m in files}
    upward = []
    for mod, path in files.items():
        for target, line in _imports(path, root):
            top = target.split(".")[0]
            if top in rank and rank[top] > rank[mod.split(".")[0]]:
                upward.append(f"{path.relative_to(root)}:{line}: {mod} imports {target}")
            if target in files and target != mod:
                graph[mod].add(target)
    return graph, upward


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layers_import_only_downward():
    _, upward = import_graph(ROOT)
    assert upward == []


def test_no_import_cycles():
    graph, _ = import_graph(ROOT)
    assert len(graph) > 40  # every module was read
    assert cycles(graph) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """Upward imports inside functions and relative imports, and a cycle through a function-level import."""
    def write(rel: str, text: str) -> None:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    for layer in LAYERS:
        write(f"{layer}/__init__.py", "")
    write("prunevision/a.py", "from . import b\n")
    write("prunevision/b.py", "def f():\n    from prunevision.a import x\n")
    write("prunevision/c.py", "def g():\n    from sweeps import run\n")
    write("sweeps/run.py", "import analysis.results\nfrom prunevision import a\n")
    write("analysis/results.py", "from ..prunevision_cli import main\n")
    write("prunevision_cli/main.py", "import analysis.results\n")
    graph, upward = import_graph(tmp_path)
    assert upward == ["prunevision/c.py:2: prunevision.c imports sweeps",
                      "prunevision/c.py:2: prunevision.c imports sweeps.run",
                      "sweeps/run.py:1: sweeps.run imports analysis.results",
                      "analysis/results.py:1: analysis.results imports prunevision_cli",
                      "analysis/results.py:1: analysis.results imports prunevision_cli.main"]
    assert sorted(cycles(graph)) == [["analysis.results", "prunevision_cli.main"], ["prunevision.a", "prunevision.b"]]


@pytest.mark.slow
def test_the_library_never_imports_ray():
    code = (
        "import sys, pkgutil, importlib, prunevision\n"
        "for m in pkgutil.iter_modules(prunevision.__path__):\n"
        "    importlib.import_module('prunevision.' + m.name)\n"
        "from prunevision_cli.main import main\n"
        "assert main(['train', '--smoke-test', '--out', sys.argv[1], '--set', 'measure.enabled=false']) == 0\n"
        "print('ray' in sys.modules)\n"
    )
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
