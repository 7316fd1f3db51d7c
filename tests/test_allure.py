"""Allure end to end: a real bench run with --alluredir, its results, and the HTML report from them."""

from __future__ import annotations

import csv
import io
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
        gates = (allure_results / attachments["gates"]["source"]).read_text()
        assert gates.startswith("status,rule,") and "pass,weights_mib > 0," in gates
        assert ("fail,eval_loss <= 0.0001," in gates) == (name == "test_finetune[lora]")  # the one failed gate
        assert attachments["loss curve"]["type"] == "image/png"
        metrics = (allure_results / attachments["metrics"]["source"]).read_text()
        assert metrics.startswith("metric,value,unit,better,counter\ntensor_peak_mib,") and "\neval_loss," in metrics
        assert all(row.split(",")[1] for row in metrics.splitlines()[1:])  # every row has a value
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


def _metrics(allure_results: Path, result: dict) -> dict[str, float]:
    attachment = next(a for a in result["attachments"] if a["name"] == "metrics")
    rows = list(csv.reader(io.StringIO((allure_results / attachment["source"]).read_text())))
    return {row[0]: float(row[1]) for row in rows[1:]}


def test_the_run_attaches_its_comparison_and_gates_as_global_attachments(allure_results):
    attachments = {a["name"]: a for p in allure_results.glob("*-globals.json")
                   for a in json.loads(p.read_text()).get("attachments", [])}
    comparison = attachments["comparison: every configuration, gates and plots (summary.html)"]
    assert comparison["type"] == "text/html"
    html = (allure_results / comparison["source"]).read_text()
    assert 'id="results-1"' in html and "qlora_nf4_r8" in html and html.count("<svg") == 5  # plots inline
    gates = (allure_results / attachments["gates: every case"]["source"]).read_text().splitlines()
    assert gates[0] == "status,case,model,data set,rule,value,bound,where"
    assert gates[1].startswith("fail,lora,")  # the failed gate leads


def test_a_case_is_timed_from_its_fixture_so_its_duration_covers_its_training(allure_results):
    for name, result in load(allure_results).items():
        train_s = _metrics(allure_results, result)["train_s"]
        assert (result["stop"] - result["start"]) / 1000 >= train_s, name


def test_teardown_steps_are_named_not_lambdas(allure_results):
    containers = [json.loads(p.read_text()) for p in allure_results.glob("*-container.json")]
    afters = [a["name"] for c in containers for a in c.get("afters", [])]
    assert afters and not [n for n in afters if "<lambda>" in n]
