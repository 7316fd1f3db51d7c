"""The pytest plugin as installed: its entry point, and a project outside this repository using it."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from lorabench.matrix import DEFAULT_CONFIGS

# the case the outside project runs: the smallest of the rank sweep, quick on the CPU
CASE = next(c.id for c in DEFAULT_CONFIGS if c.id == "qlora_nf4_r8")

OUTSIDE_TEST = '''\
from lorabench.pytest_plugin import assert_case_passed


def test_my_finetune(finetune_result):
    assert finetune_result.metrics["train_loss_final"] > 0
    assert_case_passed(finetune_result)
'''

# one rule the case meets and one it cannot (the tiny model's eval loss is ~1 nat after 5 steps)
OUTSIDE_GATES = f"""\
version: 1
profiles:
  default:
    {CASE}:
      - eval_loss > 0
      - eval_loss <= 0.0001
"""


def test_the_entry_point_is_installed_and_loaded(pytestconfig):
    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "lorabench"]
    assert ep.value == "lorabench.pytest_plugin"
    # loaded by pytest under the entry point's name (the root conftest.py registers it only without one)
    assert pytestconfig.pluginmanager.get_plugin("lorabench").__name__ == "lorabench.pytest_plugin"


def _pytest(project, *args):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(project), *args],
                          cwd=project, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_a_project_outside_the_repository_runs_a_case_with_the_plugin(tmp_path):
    """Only a test file and thresholds.yaml, nothing installed beyond lorabench: the plugin's options, markers,
    fixtures and gates come through the entry point, the gates from the project's own thresholds.yaml."""
    project = tmp_path / "my-training-repo"
    project.mkdir()
    (project / "test_my_finetune.py").write_text(OUTSIDE_TEST)
    gates = project / "thresholds.yaml"
    gates.write_text(OUTSIDE_GATES)
    out = project / "run.json"
    proc = _pytest(project, "--strict-markers", "-k", f"config[{CASE}]", "--steps", "5", "--isolate", "none",
                   f"--benchmark-json={out}")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 failed" in proc.stdout and f"test_my_finetune[{CASE}]" in proc.stdout
    assert f"violates 'eval_loss <= 0.0001'  [{gates}:6, profile default]" in proc.stdout
    assert "lorabench summary" in proc.stdout
    (bench,) = json.loads(out.read_text())["benchmarks"]
    assert bench["stats"]["rounds"] == 5 - 3  # the timing protocol: the steps after warm-up
    info = bench["extra_info"]
    assert info["status"] == "ok" and info["config_id"] == CASE and info["config"]["steps"] == 5
    assert info["metrics"]["eval_loss"] > 0
    assert {(g["rule"], g["status"]) for g in info["gates"]} == {("eval_loss > 0", "pass"),
                                                                ("eval_loss <= 0.0001", "fail")}


def test_a_run_that_uses_none_of_it_is_left_as_it_is(tmp_path):
    """The plugin loads in every run where lorabench is installed; one that collects no bench case keeps its
    own log records (below -v, a bench run shows lorabench's alone) and gets no lorabench machine info."""
    (tmp_path / "test_mine.py").write_text(
        "import logging\n\n\ndef test_mine(benchmark):\n"
        "    logging.getLogger('mine').warning('my own warning')\n    benchmark(sum, [1, 2])\n    assert False\n")
    out = tmp_path / "run.json"
    proc = _pytest(tmp_path, f"--benchmark-json={out}")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lorabench-" in proc.stdout  # loaded (pytest's plugins line)
    assert "Captured log call" in proc.stdout and "my own warning" in proc.stdout
    assert "torch_version" not in json.loads(out.read_text())["machine_info"]


def test_the_plugin_can_be_turned_off(tmp_path):
    (tmp_path / "test_my_finetune.py").write_text(OUTSIDE_TEST)
    proc = _pytest(tmp_path, "-p", "no:lorabench")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fixture 'finetune_result' not found" in proc.stdout
    assert "--steps" not in _pytest(tmp_path, "-p", "no:lorabench", "--help").stdout
