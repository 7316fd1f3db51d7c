"""scripts/gpu-check: its plan and its output format, checked without a GPU (``--plan``)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"


def _script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def test_the_plan_names_both_models_its_cases_and_stays_within_8_minutes(tmp_path):
    out = tmp_path / "gpu-check.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "No GPU figures exist yet" in text
    assert "preset:qwen2.5-0.5b" in text and "-> qlora_nf4, qlora_fp4, qlora_nf4_r8" in text
    assert "preset:llama-2-7b" in text and "batch 1 x 512 tokens" in text and "lora_int8" in text
    gpu = _script()
    assert sum(step.timeout_s for step in gpu.PLAN) + gpu.BUILD_S <= gpu.BUDGET_S == 8 * 60
    rows = [line for line in text.splitlines() if line.startswith("| qwen") or line.startswith("| llama")]
    assert len(rows) == 9  # six -m qlora cases on the 0.5B model, three on the 7B shape
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(gpu.COLUMNS)
        assert set(cells[2:]) == {"not measured"}  # nothing invented


def test_a_case_record_becomes_a_row_and_an_absent_figure_reads_not_measured():
    gpu = _script()
    bench = {"name": "test_finetune[qlora_nf4]", "stats": {"median": 0.2345, "iqr": 0.0123},
             "extra_info": {"case_id": "qlora_nf4", "metrics": {
                 "peak_alloc_mib": 5000.4, "predicted_alloc_mib": 5100.0, "alloc_prediction_error_pct": 2.0,
                 "peak_reserved_mib": 5400.0, "predicted_reserved_mib": 5300.0, "reserved_prediction_error_pct": -1.85,
                 "prediction_error_pct": 0.01, "mfu_pct": 31.25}}}
    cells = gpu.row("llama-2-7b", bench)
    assert cells["case"] == "qlora_nf4"
    assert (cells["peak_alloc_mib"], cells["alloc err %"], cells["reserved err %"]) == ("5000", "+2.0", "-1.9")
    assert cells["device_used_max_mib"] == "not measured" and cells["device err %"] == "not measured"
    assert cells["step ms median [IQR]"] == "234 [12]"
    assert cells["MFU %"] == "31.2"
    page = gpu.render([cells], {"date": "2026-01-01", "device": "NVIDIA H100"}, ["plan"], measured=True)
    assert "No GPU figures exist yet" not in page
    assert "| llama-2-7b | qlora_nf4 | 5000 | 5100 | +2.0 |" in page


def test_each_wheel_set_is_named_and_the_missing_packages_are_found():
    gpu = _script()
    assert "bitsandbytes" in gpu.WHEEL_SETS["bnb"] and gpu.WHEEL_SETS["arrow"] == ("pyarrow",)
    assert gpu.CARRY_LIMIT_BYTES == 64 * 2**20
