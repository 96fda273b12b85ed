"""The package layout and the import graph of the first-party packages (`modules`, `data`, `trainer`).

The graph is read with `ast` from the source files, top-level and function-level (lazy) imports alike, so a cycle
hidden inside a function still counts. An import of `pkg.sub` from outside `pkg` also depends on `pkg/__init__.py`
(Python runs it first), so a package `__init__` that imports a module which imports the package back is a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modules", "data", "trainer")
ADAPTER_FILES = {"__init__.py", "base.py", "llava.py", "llava_next.py", "qwen.py"}  # base + one file per model family


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The first-party module `name` refers to: itself, or the nearest enclosing module (an attribute import)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_names(path: Path, name: str) -> list[str]:
    """Every dotted name `path` imports, anywhere in the file (`from a import b` yields a.b and a)."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            out.append(stem)
            out += [f"{stem}.{alias.name}" for alias in node.names]
    return out


def import_graph() -> dict[str, set[str]]:
    modules = first_party_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target in imported_names(path, name):
            target = resolve(target, modules)
            # `from pkg import sub` inside pkg: pkg is already initialised (or initialising) by then, not an edge
            if target is None or target == name or name.startswith(target + "."):
                continue
            graph[name].add(target)
            # importing pkg.sub from outside pkg runs pkg/__init__.py first
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and not (name == parent or name.startswith(parent + ".")):
                    graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_sees_top_level_lazy_and_package_imports():
    graph = import_graph()
    assert "modules.budget" in graph["modules.head"]  # top level
    assert "data.toyworld" in graph["data.datamodule"]  # inside a function: `from data import toyworld`
    assert "modules.selectors" in graph["modules.head"]  # importing modules.selectors.base runs the package first
    assert "data" not in graph["data.datamodule"]  # a package's own modules do not depend on its __init__
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_engine_and_head_do_not_import_each_other():
    graph = import_graph()
    assert "modules.head" not in graph["modules.pruned_vlm"], "the engine imports the learned head"
    assert "modules.pruned_vlm" not in graph["modules.head"], "the learned head imports the engine"


def test_adapters_import_no_engine_head_trainer_or_data():
    graph = import_graph()
    forbidden = ("modules.head", "modules.pruned_vlm", "modules.distill", "data")
    for name, deps in graph.items():
        if name == "modules.vlm" or name.startswith("modules.vlm."):
            bad = sorted(d for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden))
            assert not bad, f"{name} imports {bad}"


def test_vlm_package_holds_only_the_adapters():
    files = {p.name for p in (ROOT / "modules" / "vlm").iterdir() if p.suffix == ".py" or p.is_dir()}
    files.discard("__pycache__")
    assert files == ADAPTER_FILES, f"modules/vlm/ holds more than the family adapters: {sorted(files - ADAPTER_FILES)}"
