"""The result record: one case's outcome, the one currency shared by gates, history and reports.

It serializes to the ``extra_info`` JSON that pytest-benchmark stores, and back.
A metric that was not measured is absent from ``metrics`` and present in
``absent`` with the reason; it is never recorded as 0.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
STATUS_OK = "ok"
STATUS_DOES_NOT_FIT = "does_not_fit"
STATUS_ERROR = "error"
STATUS_TIMEOUT = "timeout"
STATUS_DIVERGED = "diverged"  # the training loss became non-finite or broke the divergence rule
# Outcomes that say the case itself went wrong (not a measurement such as "does not fit").
FAILED_STATUSES = (STATUS_ERROR, STATUS_TIMEOUT, STATUS_DIVERGED)


def plain_reason(why: str) -> str:
    """An absence reason without a leading "not measured: " (records before 2026-12 carried one)."""
    while why.lower().startswith("not measured: "):
        why = why[len("not measured: "):]
    return why


# The per-step series of a record (one value per optimizer step, warm-up included).
STEP_CURVES = ("loss_curve", "step_ms_curve", "control_ms_curve", "step_cpu_ms_curve", "control_cpu_ms_curve")


@dataclass
class CaseResult:
    case_id: str
    config_id: str
    model: str
    dataset: str
    device: str
    config: dict[str, Any]
    status: str = STATUS_OK
    metrics: dict[str, float] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    loss_curve: list[float] = field(default_factory=list)
    step_ms_curve: list[float] = field(default_factory=list)
    control_ms_curve: list[float] = field(default_factory=list)  # the control workload before each step
    step_cpu_ms_curve: list[float] = field(default_factory=list)  # the case process's CPU time per step
    control_cpu_ms_curve: list[float] = field(default_factory=list)  # its CPU time over each control
    environment: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)  # breakdowns behind a metric (per-layer errors)
    # With --seeds: each seed's record ({"seed", "status", "error", "metrics"} and every one of STEP_CURVES),
    # and per metric {"n", "sd", "ci_low", "ci_high"}; ``metrics`` then holds the means (lorabench.evaluation.seeds).
    seeds: list[dict[str, Any]] = field(default_factory=list)
    spread: dict[str, dict[str, float]] = field(default_factory=dict)

    def set(self, name: str, value: float | None, *, reason: str = "", source: str = "") -> None:
        """Record a metric, or its absence with ``reason`` when ``value`` is None or not finite."""
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            self.absent[name] = reason or f"not finite: {value!r}"
            self.metrics.pop(name, None)
            return
        self.metrics[name] = float(value)
        self.absent.pop(name, None)
        if source:
            self.sources[name] = source

    def merge(self, reading) -> None:
        """Put a meter's reading (:class:`lorabench.meters.memory.Reading`) into the record: its figures, their
        sources, and the reason for each figure it could not measure."""
        for name, value in reading.metrics.items():
            self.set(name, value, source=reading.sources.get(name, ""))
        for name, why in reading.absent.items():
            self.set(name, None, reason=why)

    @classmethod
    def unmeasured(cls, case, config, *, case_id: str, device, status: str, error: str) -> CaseResult:
        """The record of a case that stopped before it could report anything."""
        return cls(case_id=case_id, config_id=config.id, model=case.model, dataset=case.dataset,
                   device=str(device), config=config.to_dict(), status=status, error=error)

    def to_extra_info(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_extra_info(cls, data: dict[str, Any]) -> CaseResult:
        """Rebuild from stored ``extra_info`` (:func:`read_record`, its findings dropped: for records this
        version has just written).

        Raises:
            ValueError: the data is not a lorabench record of a known schema, or a field has the wrong type.
        """
        return read_record(data)[0]


# A metric whose stored value is not a finite number is read as absent with this reason, so that a gate
# reading B treats it as a regression (lorabench.gates.compare) rather than as "not measured".
INVALID_STORED = "stored value is not a finite number"
_TEXT_FIELDS = ("case_id", "config_id", "model", "dataset", "device", "status")
_MAPPING_FIELDS = ("config", "absent", "sources", "environment", "details", "spread")
_LIST_FIELDS = ("gates", "seeds")
# Timing curves gate speed step by step; a non-finite entry there makes the per-step test meaningless.
TIMING_CURVES = tuple(c for c in STEP_CURVES if c != "loss_curve")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_record(data: dict[str, Any]) -> tuple[CaseResult, list[str]]:
    """A stored record, checked field by field before it is built.

    Values that cannot stand are read around and reported: a metric that is NaN, infinite or not a
    number becomes absent with the reason :data:`INVALID_STORED`; a timing curve with such an entry is
    dropped (its per-step test is then not evaluable); an unknown key is ignored. The loss curve may
    hold non-finite values: a diverged case records them.

    Returns:
        The record, and one line per value read around (naming the metric, curve or key).

    Raises:
        ValueError: not a lorabench record of a known schema, a missing key, or a field of the wrong type,
            naming the key and what it must be.
    """
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ValueError(f"not a lorabench result of schema {SCHEMA_VERSION}: schema={schema!r}")
    known = {f.name for f in fields(CaseResult)}
    findings = [f"unknown record key {key!r} ignored (not a field of a schema {SCHEMA_VERSION} record)" for key in data if key != "schema" and key not in known]
    values = {k: v for k, v in data.items() if k in known}
    required = [f.name for f in fields(CaseResult) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"missing record key(s) {', '.join(map(repr, missing))}")
    for key in _TEXT_FIELDS:
        if key in values and not isinstance(values[key], str):
            raise ValueError(f"record key {key!r}: {values[key]!r} must be text")
    for key in _MAPPING_FIELDS + ("metrics",):
        if key in values and not isinstance(values[key], dict):
            raise ValueError(f"record key {key!r}: must be a mapping, not {type(values[key]).__name__}")
    for key in _LIST_FIELDS + STEP_CURVES:
        if key in values and not isinstance(values[key], list):
            raise ValueError(f"record key {key!r}: must be a list, not {type(values[key]).__name__}")
    if values.get("error") is not None and not isinstance(values["error"], str):
        raise ValueError(f"record key 'error': {values['error']!r} must be text or null")
    for curve in STEP_CURVES:
        bad = [(i, v) for i, v in enumerate(values.get(curve, [])) if not _is_number(v)]
        if bad:
            raise ValueError(f"record key {curve!r}: entry {bad[0][0]} is {bad[0][1]!r}, not a number")
    result = _build(values)
    for name, value in list(result.metrics.items()):
        if not (_is_number(value) and math.isfinite(value)):
            kind = "not a number" if not _is_number(value) else "not finite"
            findings.append(f"metric {name} is {value!r} ({kind}): read as not measured")
            result.metrics.pop(name)
            result.absent[name] = f"{INVALID_STORED}: {value!r}"
    for i, seed in enumerate(result.seeds):  # each seed's figures feed the seeds' t-tests and intervals
        if not isinstance(seed, dict) or not isinstance(seed.get("metrics", {}), dict):
            raise ValueError(f"record key 'seeds': entry {i} must be a mapping with a 'metrics' mapping")
        bad = {k: v for k, v in seed.get("metrics", {}).items() if not (_is_number(v) and math.isfinite(v))}
        if bad:
            result.seeds[i] = {**seed, "metrics": {k: v for k, v in seed["metrics"].items() if k not in bad}}
            findings += [f"seed {seed.get('seed', i)}: metric {k} is {v!r}: left out of the seeds' statistics"
                         for k, v in bad.items()]
    for curve in TIMING_CURVES:
        steps = getattr(result, curve)
        bad = [i for i, v in enumerate(steps) if not math.isfinite(v)]
        if bad:
            findings.append(f"{curve} holds {steps[bad[0]]!r} at step {bad[0] + 1}: the curve is left out, so the "
                            "per-step speed test of this case is not evaluable")
            setattr(result, curve, [])
    return result, findings


def _build(values: dict[str, Any]) -> CaseResult:
    """A record from checked values; the metrics dict is copied, so reading around a value never edits the input."""
    return CaseResult(**{**values, "metrics": dict(values.get("metrics", {})), "absent": dict(values.get("absent", {})),
                         "seeds": list(values.get("seeds", []))})
