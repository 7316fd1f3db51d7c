"""End to end: the bench as a user runs it, in a subprocess, with storage and gates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench"), "-p", "no:cacheprovider", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


def test_a_case_end_to_end(two_case_run):
    proc = two_case_run.proc
    assert "lorabench summary" in proc.stdout
    assert "qlora_nf4_r8" in proc.stdout
    first = next(line for line in proc.stdout.splitlines() if line.startswith("lorabench: "))
    assert first.startswith("lorabench: 2 case(s) [")
    assert "qlora_nf4_r8" in first and "] on tiny-llama x digit-reverse, cpu in " in first
    assert "expected about " in first
    assert "seconds per phase (wall clock):" in proc.stdout and "qlora_nf4_r8: load " in proc.stdout
    assert "evaluating the base model" in proc.stdout and "training ETA" in proc.stdout
    data = json.loads(two_case_run.benchmark_json.read_text())
    benches = {b["extra_info"]["config_id"]: b for b in data["benchmarks"]}
    assert set(benches) == {"qlora_nf4_r8", "lora"}  # a case that fails a gate is still recorded
    bench = benches["qlora_nf4_r8"]
    assert bench["stats"]["rounds"] == 8 - 3  # measured steps: all but the warm-up
    assert bench["stats"]["median"] > 0  # wall clock: no bound, the machine may be busy
    info = bench["extra_info"]
    assert info["status"] == "ok" and info["config_id"] == "qlora_nf4_r8"
    assert info["metrics"]["quant_linear_ratio"] <= 0.3
    assert info["metrics"]["peak_rss_delta_mib"] > 0
    assert "not CUDA" in info["absent"]["peak_alloc_mib"]
    assert info["gates"] and all(g["status"] in ("pass", "not evaluated") for g in info["gates"])
    assert any(g["status"] == "fail" for g in benches["lora"]["extra_info"]["gates"])
    machine = data["machine_info"]
    for key in ("torch_version", "transformers_version", "peft_version", "bitsandbytes_version", "gpu_name"):
        assert key in machine


def test_a_violated_gate_fails_its_case_and_says_where(two_case_run):
    proc, gates = two_case_run.proc, two_case_run.gates
    assert proc.returncode == 1
    # one block per failed case: the case with its model, data set and configuration, the rule and where it is
    # written, the value and the bound; printed once, in the failure itself (the summary lists the case in a line)
    header = "lora (model tiny-llama, data set digit-reverse, configuration lora): 1 gate failed"
    # pytest's one-line summary ("FAILED ... - gate(s) failed: ...") repeats its first line, as far as the
    # terminal is wide: it is not counted
    blocks = [line for line in proc.stdout.splitlines() if header in line and not line.startswith("FAILED ")]
    assert len(blocks) == 1, proc.stdout
    assert "lora: 'eval_loss <= 0.0001' (its block is under FAILURES above)" in proc.stdout
    assert f"violates 'eval_loss <= 0.0001'  [{gates}:5, profile default]" in proc.stdout
    assert "lora.eval_loss = " in proc.stdout and ": bound <= 0.0001" in proc.stdout
    # no record repr, no harness traceback, no library progress bars or deprecation notices
    output = proc.stdout + proc.stderr
    for noise in ("CaseResult(", "Traceback", "pytest_plugin/case.py", "Loading weights", "FutureWarning",
                  "DeprecationWarning", "it/s]"):
        assert noise not in output, noise


def test_a_malformed_thresholds_file_stops_the_run_before_training(tmp_path):
    gates = tmp_path / "gates.yaml"
    gates.write_text("version: 1\nprofiles:\n  default:\n    '*':\n      - peak_vram <= 3\n")
    proc = run_bench("-k", "qlora_nf4_r8", f"--thresholds={gates}", "--rootdir", str(ROOT))
    assert proc.returncode == 4  # pytest's usage error
    assert f"{gates}:5: unknown metric 'peak_vram'" in proc.stderr
    assert "step 1/" not in proc.stdout


def test_cases_of_any_kind_run_alone_are_gated(tmp_path):
    """bench/test_quant_error.py alone (no fine-tuning case collected) still reads and applies the gates."""
    gates = tmp_path / "gates.yaml"
    gates.write_text("version: 1\nprofiles:\n  default:\n    quant_error_normal:\n      - nf4_rel_error_mean <= 0.0001\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_quant_error.py"), "-p", "no:cacheprovider",
         "-k", "normal", f"--thresholds={gates}", "--rootdir", str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "violates 'nf4_rel_error_mean <= 0.0001'" in proc.stdout
