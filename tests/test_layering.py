"""The package's layers import only downward, and no modules import each other in a circle.

Every `import` statement counts, wherever it sits (a function body or `if TYPE_CHECKING:` too): an import
deferred into a function still makes the importing module depend on the imported one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import prefixtune

PACKAGE = Path(prefixtune.__file__).resolve().parent

# Lowest first. A unit is a top-level module or subpackage; a unit may import units of lower layers and its
# own modules, never a unit of its own layer or above. The data flow: data -> train -> store -> engine ->
# server, with eval and bench beside them.
LAYERS: list[set[str]] = [
    {"errors", "paths", "fileio", "version", "runtime"},  # leaves: import nothing of the package
    {"data", "prefix", "templates"},
    {"fingerprint"},
    {"models", "quantize", "adapter_folder"},
    {"store"},
    {"train", "engine"},  # training and inference share prefix/models/store, never each other
    {"eval", "server", "testing"},
    {"bench", "demo", "doctor"},
    {"cli"},
    {"__main__", ""},  # "" is the package root (its lazy public names)
]
LEAVES = LAYERS[0]

def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """`prefixtune.a.b.c` -> the longest known module name ("a.b" when c is a function), None if outside."""
    if name != "prefixtune" and not name.startswith("prefixtune."):
        return None
    name = name.removeprefix("prefixtune").removeprefix(".")
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _imports(module: str) -> dict[str, int]:
    """Modules of the package that `module` imports (any depth of the file), each with a line number."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = ["prefixtune", *package][: len(package) + 2 - node.level]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names = [f"{base}.{a.name}" for a in node.names]
        for name in names:
            target = _target(name)
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _unit(module: str) -> str:
    return module.split(".")[0] if module else ""


def _layer(module: str) -> int:
    unit = _unit(module)
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"{module}: its unit {unit!r} is in no layer of LAYERS; add it")


def _circles() -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_circles():
    circles = set(_circles())
    assert not circles, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in circles)


def test_layers_import_only_downward():
    upward = []
    for module, targets in GRAPH.items():
        for target, line in targets.items():
            if _unit(target) == _unit(module):
                continue  # inside one unit the circle test keeps the order
            if _layer(target) >= _layer(module):
                upward.append(f"{module}:{line} imports {target}")
    assert not upward, "imports that are not downward:\n" + "\n".join(sorted(upward))


def test_leaves_import_nothing_of_the_package():
    for module in MODULES:
        if _unit(module) in LEAVES:
            assert not GRAPH[module], f"{module} is a leaf but imports {sorted(GRAPH[module])}"


def test_the_graph_sees_function_level_imports():
    # The walk must count imports inside functions, or a circle hidden in a function would pass.
    assert "prefix.peft_io" in GRAPH["store"] and "train.config" in GRAPH["cli.train_cmd"]
    assert "errors" in GRAPH["cli.common"]
