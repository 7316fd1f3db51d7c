"""The result record: absent is never zero; it round-trips through extra_info."""

from __future__ import annotations

import json
import math

import pytest

from lorabench.result import CaseResult


def make() -> CaseResult:
    return CaseResult(case_id="qlora_nf4", config_id="qlora_nf4", model="tiny-llama", dataset="digit-reverse",
                      device="cpu", config={"rank": 16})


def test_missing_or_non_finite_values_are_absent_with_a_reason():
    r = make()
    r.set("peak_alloc_mib", None, reason="ran on cpu")
    r.set("eval_loss", math.nan)
    r.set("step_ms", 12.5, source="median")
    assert r.metrics == {"step_ms": 12.5}
    assert r.absent == {"peak_alloc_mib": "ran on cpu", "eval_loss": "not finite: nan"}
    r.set("eval_loss", 1.0)
    assert "eval_loss" not in r.absent


def test_round_trip_through_json():
    r = make()
    r.set("step_ms", 3.0)
    r.loss_curve = [2.0, 1.0]
    data = json.loads(json.dumps(r.to_extra_info()))
    assert CaseResult.from_extra_info(data) == r


def test_foreign_extra_info_is_refused():
    with pytest.raises(ValueError, match="not a lorabench result"):
        CaseResult.from_extra_info({"foo": 1})
