"""The package's import graph: no cycles, and every import points down the layers.

Layers, top to bottom; a module may import its own layer and any layer below it:
  cli, bench, deploy, train   entry points and tools
  api                         the HTTP server
  engine                      scheduler, KV cache, model runner
  lora                        adapters: PEFT format, catalog, residency, ops
  model                       the base model
  config, config_fields,      settings (a leaf: anything may import it; so may the package root)
  lora_config
Within lora/, ops/ (the mixed-adapter matmuls) reads the slot table (slots.py) and the adapters'
weights (lora_model.py), and nothing else of lora/ (not manager, residency, registry, store).

The graph is read from the source with ast, not by importing it: every `import` and
`from ... import`, relative ones resolved, including those inside functions and under
`if TYPE_CHECKING:`; not those of a script's `if __name__ == "__main__":` block, which run in another
module (`__main__`). `from pkg import name` is an edge to pkg.name when that is a module, else to pkg.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "lora_serve"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS = {
    "config": 0,
    "config_fields": 0,
    "lora_config": 0,
    "model": 1,
    "lora": 2,
    "engine": 3,
    "api": 4,
    "cli": 5,
    "bench": 5,
    "deploy": 5,
    "train": 5,
}
OPS_MAY_IMPORT = ("slots", "lora_model")  # of lora/, besides ops/ itself (and the layers below lora)

Graph = dict[str, set[str]]


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every .py under root (a package's own name for its __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import statement anywhere in the file."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str | None]] = []
    for node in _nodes_run_on_import(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]  # `.` is the module's own package
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def _nodes_run_on_import(tree: ast.Module):
    """Every node of the module but the body of a top-level `if __name__ == "__main__":`. That runs only
    when the file is run as a script, as the module `__main__`, a module other than the one imported
    under the file's name: importing it again there (as `python -m lora_serve.deploy.ray_serve` does, so
    that Ray pickles its classes by reference) is no cycle."""
    for top in tree.body:
        script = isinstance(top, ast.If) and ast.unparse(top.test) in ("__name__ == '__main__'", "'__main__' == __name__")
        for node in top.orelse if script else [top]:
            yield from ast.walk(node)


def import_graph(root: Path, package: str) -> tuple[Graph, list[str]]:
    """(module -> modules of the package it imports, imports of the package that name no module)."""
    modules = find_modules(root, package)
    graph: Graph = {m: set() for m in modules}
    unresolved = []
    for module, path in modules.items():
        for base, name in imported_names(module, path):
            if base != package and not base.startswith(package + "."):
                continue
            if name is not None and f"{base}.{name}" in modules:
                target = f"{base}.{name}"
            elif base in modules:
                target = base
            else:
                unresolved.append(f"{module} imports {base}" + (f".{name}" if name else ""))
                continue
            graph[module].add(target)
    return graph, unresolved


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: Graph, component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, inside the component."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in {component}")  # a component of Tarjan's has one


def layer(module: str) -> int | None:
    """The module's layer (0: bottom), None when the package's layers do not place it."""
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["config"]  # the package root: its name and version, imported from anywhere
    return LAYERS.get(parts[1])


def layering_violations(graph: Graph, package: str) -> list[str]:
    """Each edge "a.b -> c.d" that points up a layer, or from lora/ops to a lora module other than those it may read."""
    lora, ops = f"{package}.lora", f"{package}.lora.ops"
    ops_may_import = {f"{lora}.{name}" for name in OPS_MAY_IMPORT}
    bad = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            upward = layer(source) < layer(target)
            ops_reaching_up = _within(source, ops) and _within(target, lora) and not _within(target, ops) and target not in ops_may_import
            if upward or ops_reaching_up:
                bad.append(f"{source} -> {target}")
    return bad


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def write_package(root: Path, files: dict[str, str]) -> None:
    """A toy package for the checks' own tests: file path under root -> source."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_every_module_has_a_layer():
    assert [m for m in find_modules(SOURCE, PACKAGE) if layer(m) is None] == []


def test_every_import_of_the_package_names_a_module():
    assert import_graph(SOURCE, PACKAGE)[1] == []


def test_no_import_cycles():
    found = cycles(import_graph(SOURCE, PACKAGE)[0])
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_imports_point_down_the_layers():
    bad = layering_violations(import_graph(SOURCE, PACKAGE)[0], PACKAGE)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_graph_sees_relative_function_level_and_type_checking_imports(tmp_path):
    # A toy package: a cycle closed by an import inside a function, an upward edge under TYPE_CHECKING,
    # a script block importing its own module (no edge).
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "config.py": "",
        "lora/__init__.py": "",
        "lora/ops/__init__.py": "",
        "lora/ops/a.py": "from . import b\nfrom ..slots import X\n",
        "lora/ops/b.py": "def f():\n    from .c import g\n",
        "lora/ops/c.py": "import pkg.lora.ops.a\nfrom ...config import Y\nfrom ..manager import Z\n"
        "if __name__ == '__main__':\n    from pkg.lora.ops import c\n",
        "lora/slots.py": "",
        "lora/manager.py": "",
        "model/__init__.py": "",
        "model/linear.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..lora import slots\n",
    }
    write_package(root, files)
    graph, unresolved = import_graph(root, "pkg")
    assert unresolved == []
    assert graph["pkg.lora.ops.a"] == {"pkg.lora.ops.b", "pkg.lora.slots"}
    assert graph["pkg.lora.ops.c"] == {"pkg.lora.ops.a", "pkg.config", "pkg.lora.manager"}
    assert cycles(graph) == [["pkg.lora.ops.a", "pkg.lora.ops.b", "pkg.lora.ops.c", "pkg.lora.ops.a"]]
    assert layering_violations(graph, "pkg") == ["pkg.lora.ops.c -> pkg.lora.manager", "pkg.model.linear -> pkg.lora.slots"]


# What api/ and deploy/ may use of lora/: the catalog and what describes an adapter (or a weighted
# composition of adapters), never residency.
DOOR_MODULES = {"catalog", "errors", "registry", "store", "files", "lora_model", "composition"}
# Attributes that lead past the catalog: the engine's residency manager (`engine.lora`, but for the
# config's `config.lora`), and residency's own parts.
RESIDENCY_ATTRIBUTES = {"lora", "residency", "slot_writer", "batch_cls", "try_admit", "prepare"}


def door_violations(root: Path, package: str) -> list[str]:
    """Imports of lora/ modules outside DOOR_MODULES, and attribute reads in RESIDENCY_ATTRIBUTES, in api/ and deploy/."""
    graph, _ = import_graph(root, package)
    modules = find_modules(root, package)
    bad = []
    for module in sorted(graph):
        if not (_within(module, f"{package}.api") or _within(module, f"{package}.deploy")):
            continue
        for target in sorted(graph[module]):
            if _within(target, f"{package}.lora") and target.split(".")[2:3] and target.split(".")[2] not in DOOR_MODULES:
                bad.append(f"{module} imports {target}")
        for node in ast.walk(ast.parse(modules[module].read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in RESIDENCY_ATTRIBUTES:
                owner = ast.unparse(node.value)
                if not (node.attr == "lora" and owner.endswith("config")):
                    bad.append(f"{module} reads {owner}.{node.attr} (line {node.lineno})")
    return bad


def test_api_and_deploy_reach_adapters_only_through_the_catalog():
    bad = door_violations(SOURCE, PACKAGE)
    assert not bad, "past the adapter catalog:\n" + "\n".join(bad)


def test_the_door_check_sees_residency_imports_and_attributes(tmp_path):
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "lora/__init__.py": "",
        "lora/catalog.py": "",
        "lora/residency.py": "",
        "api/__init__.py": "",
        "api/a.py": "from ..lora.catalog import C\nfrom ..lora import residency\n"
        "def f(engine, config):\n    engine.adapters.list(); config.lora.max_loras; engine.engine.lora.residency\n",
    }
    write_package(root, files)
    assert door_violations(root, "pkg") == [
        "pkg.api.a imports pkg.lora.residency",
        "pkg.api.a reads engine.engine.lora.residency (line 4)",
        "pkg.api.a reads engine.engine.lora (line 4)",
    ]
