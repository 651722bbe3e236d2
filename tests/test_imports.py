"""The package's modules import each other without a cycle, and each imports on its own."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Collection, Iterator
from itertools import pairwise
from pathlib import Path

PACKAGE = "mistral_nemo"
SRC = Path(__file__).resolve().parents[1] / "src"


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name), short of the
    `__main__` entry points, which run the command line when imported."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements at any depth (inside functions too), except those that only run
    for the type checker."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.orelse:
                yield from _import_statements(ast.Module(body=[branch], type_ignores=[]))
        else:
            yield from _import_statements(child)


def _packages_above(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(
    name: str, source: str, is_package: bool, modules: Collection[str]
) -> dict[str, int]:
    """The package's modules that module `name` makes Python run, each with the line of
    the first statement that does.

    How Python runs an import decides the edges. Importing `a.b.c` first runs the
    `__init__` of `a` and of `a.b`; but the packages containing the importing module are
    already running (Python starts a package before its submodules), so for them that is a
    no-op and no edge: `engine/params.py` importing `mistral_nemo.engine.blocks` depends on
    `blocks` only. What a statement names explicitly is always an edge, including the
    module's own package: `from mistral_nemo.engine import LLM` inside `engine/params.py`
    reads a name that `engine/__init__.py` defines, so if that `__init__` imports `params`
    the two need each other, which is the cycle to catch. `from pkg import sub`, where
    `sub` is a submodule, depends on `sub`, not on what `pkg/__init__` defines.
    """
    running = {*_packages_above(name), name}
    edges: dict[str, int] = {}
    for node in _import_statements(ast.parse(source, name)):
        named: list[str] = []
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                named.append(sub if sub in modules else base)
        for target in named:
            if target not in modules:
                continue  # another library
            implied = [p for p in _packages_above(target) if p not in running]
            for module in [*implied, target]:
                if module != name:
                    edges.setdefault(module, node.lineno)
    return edges


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per back edge of a depth-first walk:
    every strongly connected group of modules shows at least one."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    for root in graph:
        if root in done:
            continue
        stack = [root]
        on_stack = {root}
        pending = [iter(graph[root])]
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                pending.pop()
                done.add(stack[-1])
                on_stack.discard(stack.pop())
            elif nxt in on_stack:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in done:
                stack.append(nxt)
                on_stack.add(nxt)
                pending.append(iter(graph[nxt]))
    return cycles


def test_import_graph_has_no_cycle():
    modules = package_modules()
    graph = {
        name: imports_of(name, path.read_text(), path.name == "__init__.py", modules)
        for name, path in modules.items()
    }
    assert len(graph) > 20 and graph["mistral_nemo.checkpoint"]

    def describe(cycle: list[str]) -> str:
        steps = [f"{a} ({modules[a].relative_to(SRC)}:{graph[a][b]})" for a, b in pairwise(cycle)]
        return " -> ".join([*steps, cycle[-1]])

    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(map(describe, cycles))


def test_graph_rules_on_a_small_package():
    """`p.b` reads a name from the package whose `__init__` imports `p.b`: the cycle to
    catch. Reaching a sibling through the package, relatively or inside a function, is an
    edge to the sibling only; imports for the type checker are no edge."""
    package = {  # name: (source, is a package)
        "p": ("from p.b import X\nfrom . import c\n", True),
        "p.b": ("from p import Y\nX = 1\n", False),
        "p.c": ("import p.b\nfrom p import b\nif TYPE_CHECKING:\n    import p\n", False),
        "p.d": ("def f():\n    from .b import X\n", False),
    }
    graph = {
        name: imports_of(name, src, is_pkg, package) for name, (src, is_pkg) in package.items()
    }
    assert graph == {
        "p": {"p.b": 1, "p.c": 2},
        "p.b": {"p": 1},
        "p.c": {"p.b": 1},
        "p.d": {"p.b": 2},
    }
    assert find_cycles(graph) == [["p", "p.b", "p"]]


_IMPORT_EACH = textwrap.dedent(
    """
    import importlib, json, sys
    import torch  # stays loaded: only the package is imported afresh each time
    failures = []
    for name in json.loads(sys.argv[1]):
        for loaded in [m for m in sys.modules if m.split(".")[0] == "mistral_nemo"]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
    print(json.dumps(failures))
    """
)


def test_each_module_imports_on_its_own():
    names = list(package_modules())
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failures, "modules that fail to import alone:\n" + "\n".join(failures)
