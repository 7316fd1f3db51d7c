"""Allure end to end: a real bench run with --alluredir, its results, and the HTML report from them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
def load(allure_results: Path) -> dict[str, dict]:
    return {r["name"]: r for r in (json.loads(p.read_text()) for p in allure_results.glob("*-result.json"))}


def test_parameters_are_configuration_axes_only(allure_results):
    results = load(allure_results)
    qlora = results["test_finetune[qlora_nf4_r8]"]
    params = {p["name"]: p for p in qlora["parameters"]}
    assert params["rank"]["value"] == "8" and params["quant"]["value"] == "'nf4'"
    assert params["model"]["value"] == "'tiny-llama'"
    assert params["bench_case"].get("excluded") is True and params["bench_case"].get("mode") == "hidden"
    measured = {"eval_loss", "step_ms", "peak_rss_delta_mib", "weights_mib"}
    assert not measured & set(params)


def test_each_case_attaches_metrics_loss_curve_configuration_and_gates(allure_results):
    for name, result in load(allure_results).items():
        attachments = {a["name"]: a for a in result["attachments"]}
        assert {"metrics", "configuration", "loss curve"} <= set(attachments)
        assert ("gates" in attachments) == (name == "test_finetune[lora]")  # the only case with a gate
        assert attachments["loss curve"]["type"] == "image/png"
        metrics = (allure_results / attachments["metrics"]["source"]).read_text()
        assert metrics.startswith("metric,value,unit,better,counter or reason") and "\neval_loss," in metrics
        png = (allure_results / attachments["loss curve"]["source"]).read_bytes()
        assert png.startswith(b"\x89PNG")


def test_failed_gates_and_environment_reach_allure(allure_results):
    results = load(allure_results)
    assert results["test_finetune[qlora_nf4_r8]"]["status"] == "passed"
    failed = results["test_finetune[lora]"]
    assert failed["status"] == "failed" and "gate(s) failed" in failed["statusDetails"]["message"]
    env = (allure_results / "environment.properties").read_text()
    assert "torch_version=" in env and "cpu_isa=" in env
    assert any(c["name"] == "Failed gates" for c in json.loads((allure_results / "categories.json").read_text()))


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm for the Allure 3 command line")
def test_the_documented_command_builds_the_html_report_with_history(allure_results, allure_workdir):
    work = allure_workdir
    for round_ in (1, 2):
        proc = subprocess.run([str(work / "scripts" / "allure-report"), str(allure_results)],
                              capture_output=True, text=True, timeout=600, cwd=work)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (work / "reports" / "allure-report" / "index.html").is_file()
        history = (work / "reports" / "allure-history.jsonl").read_text().splitlines()
        assert len(history) == round_  # each generated report adds one entry to the history
