"""The layout shows the architecture: data flows cli -> serve/measure -> guard -> profiles -> system,
nothing below the CLI imports it, and no modules import each other (directly or round a cycle).
Imports inside functions count too: a cycle hidden in a function is still a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "mmlib"
# package -> the mm packages it may import (the top-level helpers paths and errors are free to all)
ALLOWED = {
    "cli": {"serve", "measure", "batch", "guard", "profiles", "models", "system"},
    "batch": {"measure", "profiles", "system"},
    "serve": {"guard", "profiles", "models", "system"},
    "measure": {"profiles", "system"},
    "guard": {"profiles", "models", "system"},
    "profiles": {"system"},
    "models": {"system"},
    "system": set(),
}
FREE = {"mmlib", "mmlib.paths", "mmlib.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The mm modules a file imports, anywhere in it (`from mmlib.x import y` counts y if it is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mmlib")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmlib"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_every_module_is_in_a_package_or_a_known_top_level_helper():
    loose = {m for m in modules() if package(m) is None} - FREE - {"mmlib.__main__", "mmlib.bootstrap"}
    assert not loose, f"modules outside the packages: {sorted(loose)}"


def test_nothing_outside_the_cli_imports_it():
    bad = {m: sorted(d for d in deps if d.startswith("mmlib.cli")) for m, deps in graph().items()
           if not m.startswith("mmlib.cli") and m != "mmlib.__main__"}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_packages_import_only_downwards(pkg):
    wrong = []
    for module, deps in graph().items():
        if package(module) != pkg:
            continue
        for d in deps:
            target = package(d)
            if d in FREE or target == pkg or target in ALLOWED[pkg]:
                continue
            wrong.append(f"{module} -> {d}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"
