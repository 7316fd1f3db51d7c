"""The GGUF extra's skip path: a missing llama-cpp-python is named with the install command."""

from __future__ import annotations

import importlib.util

from lorabench import gguf


def test_missing_extra_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reason = gguf.skip_reason()
    assert reason is not None
    assert "llama_cpp, gguf" in reason and 'pip install "lorabench[gguf]"' in reason


def test_present_extra_gives_no_skip_reason(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert gguf.missing_modules() == [] and gguf.skip_reason() is None


def test_the_extra_is_declared_in_pyproject():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extra = " ".join(project["optional-dependencies"]["gguf"])
    assert "llama-cpp-python" in extra and "gguf" in extra
