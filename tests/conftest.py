"""Shared fixtures for the engine's tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent

# Many tests start `python -m pytest bench ...` or `python -m lorabench ...` in a subprocess. Where the
# environment sets PYTHONDONTWRITEBYTECODE, each of them compiled the package (and pytest re-rewrote its
# asserts: the plugin's package is rewritten) from source again; with bytecode cached, the first one writes
# __pycache__ (git-ignored) and the rest read it. What the tests run is unchanged.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


# Under pytest-xdist (`pytest -n 2`), tests that share an expensive fixture run on one worker (below);
# these shared fixtures take milliseconds to a second, so their tests spread over the workers freely.
CHEAP_SHARED_SETUPS = frozenset({"tiny_llama", "cpu", "hub_id", "hf_home", "no_gates"})


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Tell each xdist worker the controller's ``--dist``: a worker parses the original command line, so the
    ``loadgroup`` that lorabench's plugin makes of a bare ``-n N`` would not reach it, and it would not tag
    the tests' groups that the controller's scheduler reads."""
    node.workerinput["lorabench_tests_dist"] = node.config.option.dist


def _shared_setup_group(item: pytest.Item) -> str | None:
    """The xdist group of a test that uses an expensive shared set-up: a session fixture's name, else the
    module of a module-scoped one (so one worker builds it once instead of each worker building it)."""
    module_group = None
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name)  # the fixtures pytest resolved for this test
        if not defs or name in CHEAP_SHARED_SETUPS or not defs[-1].baseid.startswith("tests"):
            continue
        if defs[-1].scope == "session":
            return name
        if defs[-1].scope == "module":
            module_group = module_group or defs[-1].baseid
    return module_group


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A plain ``pytest`` leaves out the ``integration`` tests (whole bench sessions in subprocesses, minutes
    each), so the default run stays within its time budget; any ``-m`` expression decides for itself,
    and CI runs ``pytest -m integration`` after the default run. Tests sharing an expensive set-up get
    one ``xdist_group`` (:func:`_shared_setup_group`)."""
    if getattr(config, "workerinput", {}).get("lorabench_tests_dist") == "loadgroup":
        config.option.loadgroup = True  # what xdist's worker reads to put the group into each node id
    for item in items:
        group = _shared_setup_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    if config.option.markexpr:
        return
    kept, integration = [], []
    for item in items:
        (integration if item.get_closest_marker("integration") else kept).append(item)
    if integration:
        config.hook.pytest_deselected(items=integration)
        items[:] = kept


@pytest.fixture(scope="session")
def tiny_llama():
    """The embedded tiny Llama checkpoint (shipped in the package: nothing is built)."""
    from lorabench.models.loading import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture
def quick_zoo(tmp_path, monkeypatch):
    """The zoo with a two-step pre-training recipe and an empty cache: every model (tiny-llama too, since
    its shipped checkpoint is of the full recipe) builds through the zoo's own path in seconds. For tests
    of mechanics (building, caching, loading, quantizing); the weights have learned nothing."""
    from dataclasses import replace

    from lorabench.models import zoo

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    for name, spec in list(zoo.ZOO.items()):
        monkeypatch.setitem(zoo.ZOO, name, replace(spec, pretrain=replace(spec.pretrain, steps=2)))
    return zoo


@pytest.fixture(scope="session")
def cpu():
    import torch

    return torch.device("cpu")


def add_to_hub_cache(hub: Path, repo_id: str, checkpoint: Path, *, ref: str = "main") -> Path:
    """Lay a checkpoint out as the Hugging Face hub cache does: content-addressed blobs, a snapshot
    folder of symlinks named by a commit hash, and ``refs/REF`` naming that commit.

    Returns:
        The snapshot folder.
    """
    import hashlib

    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in checkpoint.iterdir() if p.is_file() and not p.name.endswith(".lock")):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / src.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def hub_id() -> str:
    """A dotted hub id, as real ones are (Qwen2.5-7B, Llama-3.2-1B)."""
    return "acme/Tiny-Llama-0.5B"


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory, tiny_llama, hub_id) -> Path:
    """A Hugging Face home whose hub cache holds the zoo's tiny Llama under ``hub_id`` (refs main and v1)."""
    home = tmp_path_factory.mktemp("hf-home")
    for ref in ("main", "v1"):
        add_to_hub_cache(home / "hub", hub_id, Path(tiny_llama.path), ref=ref)
    return home


# lora fails an impossible rule (line 5); every case passes one that always holds
FAILING_GATE = ("version: 1\nprofiles:\n  default:\n    lora:\n      - eval_loss <= 0.0001\n"
                "    '*':\n      - weights_mib > 0\n")


@dataclass(frozen=True)
class BenchRun:
    """One finished ``pytest bench/...`` subprocess: what it printed and the files it wrote."""

    proc: subprocess.CompletedProcess
    gates: Path
    benchmark_json: Path
    allure_results: Path


@pytest.fixture(scope="session")
def two_case_run(tmp_path_factory) -> BenchRun:
    """A real bench run as a user starts it, shared by the tests that only read what it printed and wrote
    (tests/test_smoke.py, tests/test_thresholds.py, tests/test_allure.py, tests/test_rendering.py): two cases, 8 steps,
    ``--benchmark-json`` and ``--alluredir``, ``CI=1`` as on CI; qlora_nf4_r8 passes its gate and lora
    fails an impossible one."""
    tmp = tmp_path_factory.mktemp("two-case-run")
    gates = tmp / "gates.yaml"
    gates.write_text(FAILING_GATE)
    benchmark_json, results = tmp / "bench.json", tmp / "allure-results"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-k", "qlora_nf4_r8 or config[lora]", "--steps", "8", f"--thresholds={gates}",
         f"--alluredir={results}", f"--benchmark-json={benchmark_json}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "CI": "1"},
    )
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return BenchRun(proc, gates, benchmark_json, results)


@pytest.fixture(scope="session")
def allure_results(two_case_run) -> Path:
    """Allure results of a real bench run (:func:`two_case_run`)."""
    return two_case_run.allure_results


@pytest.fixture
def allure_workdir(tmp_path) -> Path:
    """A scratch copy of what `scripts/allure-report` needs (the repository's node_modules linked, not copied),
    so a test's generated report and history stay out of the checkout."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("allurerc.mjs", "package.json", "package-lock.json", "scripts"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    if (ROOT / "node_modules").is_dir():
        (work / "node_modules").symlink_to(ROOT / "node_modules")
    return work

