"""The pack's modules import one another without a cycle: every relative import counts, also one
inside a function (a lazy import that hides a cycle still ties the two modules together, and breaks
as soon as someone moves it to the top). Read from the source (ast), so the test needs no host."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("editing", "comfy_host", "nodes", "cli", "tiny")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for folder, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in mods else target)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def test_the_graph_is_read():
    g = import_graph()
    # a few edges that exist, so that a parser that reads nothing cannot pass the next test
    assert "editing.emcid.stage2" in g["editing.emcid.stage1"]
    assert "comfy_host.view" in g["comfy_host.jobs"]
    assert "editing.arch.core" in g["editing.arch.dit"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_scripts_and_benches_name_what_the_pack_has(comfy):
    """Every script and bench parses, and each name it imports from the pack exists there: they run by
    hand (no test runs them end to end), so a moved function would otherwise surface only when
    someone next measures."""
    import importlib
    missing = []
    for folder in ("bench", "scripts", "cli"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not f.endswith(".py"):
                continue
            path = os.path.join(ROOT, folder, f)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)  # a syntax error fails here
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("conceptedit."):
                    mod = importlib.import_module(node.module)
                    missing += [f"{folder}/{f}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(mod, a.name) and not os.path.exists(
                                    os.path.join(os.path.dirname(mod.__file__), a.name + ".py"))]
    assert not missing, missing
