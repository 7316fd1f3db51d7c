"""The package's layout: folders by concern, each import pointing down the layers, no cycle.

Layers, lowest first: a module may import from its own layer and the layers below it, never from
one above. The top level holds the subpackages and the core records alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lorabench"

# Lowest first. A name is a subpackage of lorabench or a module at its top level.
LAYERS = (
    ("lorabench", "errors", "yamlio", "paths", "result"),  # records and readers that everything uses
    ("backends",),                 # quantization formats and the compute dtype
    ("metrics", "config", "case_kinds"),
    ("storage",),                  # stored runs read back and written safely
    ("data",),
    ("meters",),
    ("models",),
    ("matrix",),                   # which cases a run holds
    ("evaluation",),
    ("training",),
    ("estimate",),                 # memory predicted on the meta device
    ("kinds",),                    # the case protocol and the runner of each kind
    ("run",),                      # launchers: inline, a process per case, torchrun ranks
    ("gates",),
    ("report",),
    ("pytest_plugin",),
    ("commands", "__main__"),      # python -m lorabench
    ("proofs",),                   # measurements behind the docs, run by scripts/
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
CORE_RECORDS = {"__init__.py", "__main__.py", "errors.py", "yamlio.py", "paths.py", "result.py", "metrics.py",
                "config.py", "case_kinds.py", "matrix.py"}
DATA_DIRS = {"__pycache__"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "__pycache__" in rel.parts or "slowdown" in rel.parts:  # slowdown: a sitecustomize, not a module
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    """The lorabench modules ``path`` imports (inside functions too, unless ``module_level_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lorabench"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lorabench":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in MODULES else node.module)
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1] if len(parts) > 1 else "lorabench"]


def test_the_top_level_holds_only_subpackages_and_core_records():
    files = {p.name for p in PACKAGE.iterdir() if p.is_file()}
    assert files - CORE_RECORDS == set(), "modules at the top level that belong in a subpackage"
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name not in DATA_DIRS):
        assert (folder / "__init__.py").is_file(), f"{folder.name}/ is not a subpackage"
        assert ast.get_docstring(ast.parse((folder / "__init__.py").read_text())), f"{folder.name}/ says not what it holds"


def test_every_module_and_subpackage_has_a_layer():
    for module in MODULES:
        parts = module.split(".")
        assert (parts[1] if len(parts) > 1 else "lorabench") in LAYER, f"{module} is in no layer of LAYERS"


def import_graph() -> dict[str, set[str]]:
    """Module -> the lorabench modules it imports; a package's ``__init__`` is imported with each of its
    modules, so it is no edge of its own."""
    graph = {m: {d for d in imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) -> {d} (layer {layer_of(d)})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_runs_up_a_layer():
    assert upward(import_graph()) == []


def test_no_import_cycle():
    cycle = a_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The checks above can fail: an upward import and a two-module cycle are found, a deferred import too."""
    graph = {"lorabench.errors": {"lorabench.report.summary"}, "lorabench.report.summary": {"lorabench.errors"}}
    assert upward(graph) == ["lorabench.errors (layer 0) -> lorabench.report.summary "
                             f"(layer {LAYER['report']})"]
    assert a_cycle(graph) == ["lorabench.errors", "lorabench.report.summary", "lorabench.errors"]
    assert a_cycle({"lorabench.errors": set(), "lorabench.result": {"lorabench.errors"}}) is None
    deferred = tmp_path / "deferred.py"
    deferred.write_text("def f():\n    from lorabench.report.summary import summary\n")
    assert imports(deferred) == {"lorabench.report.summary"} and imports(deferred, module_level_only=True) == set()
