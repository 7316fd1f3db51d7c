"""Case kinds register themselves; the session, the gates and the summary ask the registry, not the modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lorabench import case_kinds
from lorabench.case_kinds import CaseKind, kind_of, known_case_ids, register
from lorabench.metrics import METRICS, Metric
from lorabench.result import CaseResult
from lorabench.pytest_plugin.session import open_session
from lorabench.report.summary import render_summary

ROOT = Path(__file__).resolve().parent.parent
KIND_MODULES = ("lorabench.kinds.classify", "lorabench.kinds.inference", "lorabench.kinds.gguf", "lorabench.kinds.quant_error")


@pytest.fixture
def stopwatch_kind():
    """A kind from outside lorabench: its own case id, metric, columns and no "*" rules."""
    lap = Metric("lap_ms", "ms", "lower", "speed", "one lap of the stopwatch")
    kind = register(CaseKind("stopwatch", case_ids=lambda: ("stopwatch_lap",), wildcard_rules=False,
                             columns=lambda device: (("lap_ms", "lap ms", "lap time"),), metrics=(lap,)))
    yield kind
    del case_kinds.kinds()[kind.name], METRICS[lap.name]


def record(kind: str | None, config_id: str, device: str = "cpu", **metrics) -> CaseResult:
    config = {} if kind is None else {"kind": kind}
    r = CaseResult(case_id=config_id, config_id=config_id, model="m", dataset="d", device=device, config=config)
    r.metrics.update(metrics)
    return r


def test_every_shipped_kind_is_registered_with_its_case_ids():
    assert set(case_kinds.kinds()) >= {"finetune", "classify", "inference", "quant_error"}
    ids = known_case_ids()
    for case_id in ("full", "qlora_nf4", "minilm_qlora_nf4", "infer_nf4_adapter", "gguf_q4_0",
                    "quant_error_normal", "quant_error_minilm"):
        assert case_id in ids, case_id


def test_the_kind_decides_the_columns_and_whether_wildcard_rules_apply():
    finetune = kind_of(record(None, "lora"))
    assert finetune.wildcard_rules and finetune.columns("cpu")[0][0] == "tensor_peak_mib"
    assert finetune.columns("cuda:0")[0][0] == "peak_alloc_mib"
    assert not kind_of(record("quant_error", "quant_error_normal")).wildcard_rules
    assert not kind_of(record("inference", "infer_base")).wildcard_rules
    assert kind_of(record("classify", "minilm_lora")).wildcard_rules


def test_a_record_of_an_unregistered_kind_gets_no_columns_and_only_rules_that_name_it():
    kind = kind_of(record("from_a_plugin_not_loaded", "x"))
    assert kind.columns("cpu") == () and not kind.wildcard_rules


def test_a_kind_registered_from_outside_is_gated_and_summarized(tmp_path, stopwatch_kind):
    gates = tmp_path / "gates.yaml"
    gates.write_text("version: 1\nprofiles:\n  default:\n    '*':\n      - step_ms <= 1\n"
                     "    stopwatch_lap:\n      - lap_ms <= 5\n")
    session = open_session(root=ROOT, thresholds=str(gates))
    session.load_gates()  # the rule naming stopwatch_lap is accepted: the id is known through the registry
    lap = record("stopwatch", "stopwatch_lap", lap_ms=7.0)
    outcomes = session.gate(lap)
    assert [(o.gate.metric, o.status) for o in outcomes] == [("lap_ms", "fail")]  # the "*" step_ms rule left out
    session.results.append(lap)
    text = "\n".join(render_summary(session.results))
    assert "lap ms" in text and "7.00" in text


def test_a_kind_cannot_redefine_a_metric():
    clash = Metric("step_ms", "s", "higher", "speed", "not the step time")
    with pytest.raises(ValueError, match="'step_ms' is already defined differently"):
        register(CaseKind("clash", case_ids=tuple, columns=lambda device: (), metrics=(clash,)))
    assert "clash" not in case_kinds.kinds() and METRICS["step_ms"].unit == "ms"


def test_the_session_imports_no_kind_of_case_by_name():
    tree = ast.parse((ROOT / "lorabench" / "pytest_plugin" / "session.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & set(KIND_MODULES)
