"""What each case gives Allure (with ``--alluredir``): parameters, attachments, environment, categories.

Allure parameters are the configuration axes only: Allure builds a test's history id from
its parameters, so a measured value there would make every run a new test. Measured values
go into attachments instead: the metrics table (CSV), the loss curve (PNG), the resolved
configuration (YAML), the gate outcomes (CSV) and, for a case that errored, its traceback.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path

import allure
import yaml

from lorabench.failures import gate_value_text
from lorabench.metrics import METRICS
from lorabench.result import CaseResult, plain_reason

# Test messages the categories below match (set in bench/test_finetune.py and lorabench/pytest_plugin/case.py).
GATE_FAILED = "gate(s) failed"
DOES_NOT_FIT = "does not fit"
CASE_ERROR = "case error"
CATEGORIES = [
    {"name": "Failed gates", "matchedStatuses": ["failed"], "messageRegex": f"(?s).*{re.escape(GATE_FAILED)}.*"},
    {"name": "Does not fit", "matchedStatuses": ["skipped"], "messageRegex": f"(?s).*{re.escape(DOES_NOT_FIT)}.*"},
    {"name": "Timed out", "matchedStatuses": ["failed", "broken"], "messageRegex": f"(?s).*{re.escape('Timeout (>')}.*"},
    {"name": "Case errors", "matchedStatuses": ["failed", "broken"], "messageRegex": f"(?s).*{re.escape(CASE_ERROR)}.*"},
]


def enabled(config) -> bool:
    """Whether this pytest run writes Allure results (``--alluredir``)."""
    return bool(getattr(config.option, "allure_report_dir", None))


def set_parameters(case_id: str, model: str, dataset: str, config: dict) -> None:
    """The configuration axes as Allure parameters; pytest's own ``bench_case`` parameter is hidden."""
    allure.dynamic.parameter("bench_case", case_id, excluded=True, mode=allure.parameter_mode.HIDDEN)
    allure.dynamic.parameter("model", model)
    allure.dynamic.parameter("dataset", dataset)
    for key, value in config.items():
        if key != "id":
            allure.dynamic.parameter(key, value)


def metrics_csv(result: CaseResult) -> str:
    """metric, value, unit, better, source or why absent: one row per metric, measured or not."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["metric", "value", "unit", "better", "counter or reason"])
    for name in sorted(set(result.metrics) | set(result.absent)):
        meta = METRICS.get(name)
        unit, better = (meta.unit, meta.better or "") if meta else ("", "")
        if name in result.metrics:
            writer.writerow([name, f"{result.metrics[name]:.6g}", unit, better, result.sources.get(name, "")])
        else:
            writer.writerow([name, "", unit, better, f"not measured: {plain_reason(result.absent[name])}"])
    return out.getvalue()


def gates_csv(result: CaseResult) -> str:
    """status, rule, value, bound, the reference value of a relative rule, where it is written, profile."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["status", "rule", "value", "bound", "reference value", "where", "profile"])
    for g in result.gates:
        value, bound, reference = gate_value_text(g, result)
        writer.writerow([g["status"], g["rule"], value, bound, reference, g["where"], g.get("profile", "")])
    return out.getvalue()


def attach_result(result: CaseResult) -> None:
    from lorabench.plots import loss_curve_png

    allure.attach(metrics_csv(result), name="metrics", attachment_type=allure.attachment_type.CSV)
    allure.attach(yaml.safe_dump(result.config, sort_keys=True), name="configuration",
                  attachment_type=allure.attachment_type.YAML)
    if result.gates:
        allure.attach(gates_csv(result), name="gates", attachment_type=allure.attachment_type.CSV)
    trace = result.details.get("traceback")
    if trace:
        allure.attach(trace, name="traceback", attachment_type=allure.attachment_type.TEXT)
    if result.loss_curve:
        with tempfile.TemporaryDirectory() as tmp:
            png = loss_curve_png(result, Path(tmp) / "loss.png")
            allure.attach(png.read_bytes(), name="loss curve", attachment_type=allure.attachment_type.PNG)


def write_launch_files(results_dir: Path, machine: dict) -> None:
    """``environment.properties`` (device and versions) and ``categories.json`` in the results folder."""
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{key}={_escape(value)}" for key, value in sorted(machine.items()) if value not in (None, "")]
    (results_dir / "environment.properties").write_text("\n".join(lines) + "\n")
    (results_dir / "categories.json").write_text(json.dumps(CATEGORIES, indent=2))


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace("=", "\\=").replace(":", "\\:")
