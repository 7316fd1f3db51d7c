"""A kept fp32 copy of the trainable parameters, injected into a real run, fails the tensor-byte gates.

Two autosaved runs of one QLoRA case: A as the code is, B with ``tests/plugins/fp32_copy.py``
loaded, which makes the optimizer keep an fp32 copy of every trainable parameter.
``tensor_optimizer_mib`` and ``tensor_peak_mib`` grow by exactly the copy, and
``python -m lorabench compare --fail`` exits 1 naming them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.storage.history import latest_runs

ROOT = Path(__file__).resolve().parent.parent
CASE = "qlora_nf4_r8"


def bench_run(storage: Path, *extra: str) -> None:
    no_gates = storage.parent / "no-gates.yaml"
    no_gates.write_text("version: 1\nprofiles: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-k", CASE, "--steps", "4", "--isolate", "none", "--benchmark-autosave",
         f"--benchmark-storage=file://{storage}", f"--thresholds={no_gates}", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("benchmarks")
    bench_run(storage)                                 # 0001: A
    bench_run(storage, "-p", "tests.plugins.fp32_copy")  # 0002: B, the optimizer keeps an fp32 copy
    return storage


def test_the_kept_copy_shows_in_tensor_bytes_exactly(storage):
    a, b = latest_runs(2, storage)
    before, after = a.results[CASE].metrics, b.results[CASE].metrics
    # LoRA weights train in fp32: the copy is as large as the trainable parameters
    copy = after["trainable_mib"]
    assert after["tensor_optimizer_mib"] - before["tensor_optimizer_mib"] == pytest.approx(copy, abs=1e-6)
    assert after["tensor_peak_mib"] - before["tensor_peak_mib"] == pytest.approx(copy, abs=1e-6)
    assert after["optimizer_state_mib"] == before["optimizer_state_mib"]  # optimizer.state alone does not see it


def test_compare_fails_on_it_naming_the_tensor_metrics(storage):
    proc = subprocess.run([sys.executable, "-m", "lorabench", "compare", "1", "2", "--storage", str(storage), "--fail"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    regressions = proc.stdout.split("regression(s):", 1)[1]
    assert f"{CASE}: tensor_optimizer_mib" in regressions
    assert f"{CASE}: tensor_peak_mib" in regressions
