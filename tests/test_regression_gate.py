"""The CI gate, end to end on real runs: unchanged code passes, an injected regression fails.

Three autosaved runs of one QLoRA case into a fresh storage: A and B from the same code and
configuration, C with a configuration change that makes the adapter 8x larger (rank 8 -> 64).
``python -m lorabench compare --fail`` must exit 0 on A -> B and 1 on B -> C, naming the
metric and the configuration. (A 30% step-time slowdown is covered on stored per-step times
in test_compare.py: injecting one into a real run would need code that exists only for it.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench_run(storage: Path, *extra: str) -> None:
    # No gates: this is about comparing stored runs, and an absolute step-time gate would
    # only add the machine's load to what is tested.
    no_gates = storage.parent / "no-gates.yaml"
    no_gates.write_text("version: 1\nprofiles: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-k", "qlora_nf4_r8", "--steps", "8", "--benchmark-autosave",
         f"--benchmark-storage=file://{storage}", f"--thresholds={no_gates}", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def compare(storage: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorabench", "compare", *args, "--storage", str(storage), "--fail"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("benchmarks")
    bench_run(storage)                      # 0001: A
    bench_run(storage)                      # 0002: B, same code and configuration
    bench_run(storage, "--set", "rank=64")  # 0003: C, an 8x larger adapter
    return storage


def test_two_runs_of_unchanged_code_pass_the_gate(storage):
    proc = compare(storage, "1", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no regression" in proc.stdout


def test_an_injected_memory_regression_fails_the_gate_naming_metric_and_configuration(storage):
    proc = compare(storage, "2", "3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    regressions = proc.stdout.split("regression(s):", 1)[1]
    assert "qlora_nf4_r8: weights_mib" in regressions
    assert "qlora_nf4_r8: params_trainable" in regressions


def test_the_default_compares_the_two_latest_runs(storage):
    proc = compare(storage)
    assert proc.returncode == 1 and "A = 0002_" in proc.stdout and "B = 0003_" in proc.stdout


def test_stock_pytest_benchmark_compare_reads_the_same_files(storage):
    proc = subprocess.run(["pytest-benchmark", "--storage", f"file://{storage}", "compare", "0001", "0002"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "test_finetune[qlora_nf4_r8]" in proc.stdout
