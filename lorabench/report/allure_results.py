"""What each case and the run give Allure (with ``--alluredir``): parameters, attachments, environment,
categories, and the comparison across configurations.

Allure parameters are the configuration axes only: Allure builds a test's history id from
its parameters, so a measured value there would make every run a new test. Measured values
go into attachments instead: the metrics table (CSV, in the summary's order, measured figures
only), what was not measured and why, the loss curve (PNG), the resolved configuration (YAML),
the gate outcomes (CSV) and, for a case that errored, its traceback. A case trains in its
fixture, so its Allure test is timed from the fixture's start (:func:`time_from`).

The run itself attaches, as Allure global attachments: the comparison report (the
self-contained summary.html of :mod:`lorabench.report.pages`: model x data set, each group's table
against its baseline, findings, gates and plots) and every case's gate outcomes in one table,
lorabench's gates as their own section beside Allure's pass/fail.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import allure
import yaml

from lorabench.report.failures import gate_rows, gate_value_text
from lorabench.metrics import METRICS
from lorabench.result import CaseResult, plain_reason
from lorabench.report.summary import columns_for
from lorabench.report.pages import write_report
from lorabench.report.plots import loss_curve_png
from lorabench.storage.history import StoredRun

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


def metric_order(result: CaseResult) -> list[str]:
    """The measured metrics as the summary orders them: its table's columns, then the registry's order
    (memory, speed, quality, size: lorabench/metrics.py), then any metric the registry does not know."""
    summary = [metric for metric, _, _ in columns_for(result)]
    ordered = list(dict.fromkeys(summary + list(METRICS) + sorted(result.metrics)))
    return [name for name in ordered if name in result.metrics]


def metrics_csv(result: CaseResult) -> str:
    """metric, value, unit, better, the counter it comes from: one row per measured metric, in the summary's order
    (what was not measured is in :func:`not_measured_csv`, so no row here is empty)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["metric", "value", "unit", "better", "counter"])
    for name in metric_order(result):
        meta = METRICS.get(name)
        unit, better = (meta.unit, meta.better or "") if meta else ("", "")
        writer.writerow([name, f"{result.metrics[name]:.6g}", unit, better, result.sources.get(name, "")])
    return out.getvalue()


def not_measured_csv(result: CaseResult) -> str:
    """metric, unit, why it was not measured: one row per absent metric, by name."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["metric", "unit", "why not measured"])
    for name in sorted(result.absent):
        meta = METRICS.get(name)
        writer.writerow([name, meta.unit if meta else "", plain_reason(result.absent[name])])
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

    allure.attach(metrics_csv(result), name="metrics", attachment_type=allure.attachment_type.CSV)
    if result.absent:
        allure.attach(not_measured_csv(result), name="not measured", attachment_type=allure.attachment_type.CSV)
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


def time_from(item, started_ms: int) -> None:
    """Start ``item``'s Allure test at ``started_ms`` (ms since the epoch): allure-pytest times a test from its
    call phase, and a bench case trains in its fixture, before the call. Nothing happens without allure-pytest's
    listener (the attribute names are allure-pytest 2.x's)."""
    listener = item.config.pluginmanager.get_plugin("allure_listener")
    uuid = listener._cache.get(item.nodeid) if listener is not None else None
    test = listener.allure_logger.get_test(uuid) if uuid else None
    if test is not None and test.start:
        test.start = min(test.start, started_ms)


def name_finalizers(fixturedef) -> None:
    """Give each teardown pytest registered for a fixture a name, so Allure lists ``benchmark::teardown`` and
    ``bench_session::finish finetune_result`` where it would list ``benchmark::0`` or ``::<lambda>``.

    allure-pytest names a finalizer ``fixture::__name__`` (its index where it has none, as pytest's
    ``functools.partial`` objects); it reads the name right after the fixture is set up, so this runs
    just before it (a ``trylast`` wrapper of ``pytest_fixture_setup``).
    """
    for finalizer in getattr(fixturedef, "_finalizers", []):
        name = _finalizer_name(finalizer)
        if name:
            finalizer.__name__ = name  # partial objects and functions both take the attribute


def _finalizer_name(finalizer) -> str | None:
    func = getattr(finalizer, "func", None)  # a functools.partial
    if func is None:
        code = getattr(finalizer, "__code__", None)
        if getattr(finalizer, "__name__", "") == "<lambda>" and code is not None:
            return f"finalizer at {Path(code.co_filename).name}:{code.co_firstlineno}"
        return None
    if getattr(func, "__name__", "") == "_teardown_yield_fixture":
        return "teardown"  # the fixture's code after its yield
    owner = getattr(func, "__self__", None)  # FixtureDef.finish of a fixture that depends on this one
    if getattr(func, "__name__", "") == "finish" and hasattr(owner, "argname"):
        return f"finish {owner.argname}"
    return getattr(func, "__name__", None)


def run_gates_csv(results: list[CaseResult]) -> str:
    """Every case's gate outcomes in one table, failures first (the report's gates table)."""
    out = io.StringIO()
    csv.writer(out).writerows(gate_rows(results))
    return out.getvalue()


def attach_run(results: list[CaseResult], machine: dict) -> None:
    """The run's comparison across configurations and its gates, as Allure global attachments."""

    if not results:
        return
    run = StoredRun(path=Path("."), number=0, name="this run", datetime=datetime.now(timezone.utc).isoformat(),
                    commit={}, machine=machine, results={r.case_id: r for r in results})
    with tempfile.TemporaryDirectory() as tmp:
        write_report(run, Path(tmp))
        html = (Path(tmp) / "summary.html").read_text()
    allure.global_attach(html, name="comparison: every configuration, gates and plots (summary.html)",
                         attachment_type=allure.attachment_type.HTML)
    if any(r.gates for r in results):
        allure.global_attach(run_gates_csv(results), name="gates: every case",
                             attachment_type=allure.attachment_type.CSV)


def write_launch_files(results_dir: Path, machine: dict) -> None:
    """``environment.properties`` (device and versions) and ``categories.json`` in the results folder."""
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{key}={_escape(value)}" for key, value in sorted(machine.items()) if value not in (None, "")]
    (results_dir / "environment.properties").write_text("\n".join(lines) + "\n")
    (results_dir / "categories.json").write_text(json.dumps(CATEGORIES, indent=2))


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace("=", "\\=").replace(":", "\\:")
