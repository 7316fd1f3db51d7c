"""The result record: one case's outcome, the one currency shared by gates, history and reports.

It serializes to the ``extra_info`` JSON that pytest-benchmark stores, and back.
A metric that was not measured is absent from ``metrics`` and present in
``absent`` with the reason; it is never recorded as 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
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
    # and per metric {"n", "sd", "ci_low", "ci_high"}; ``metrics`` then holds the means (lorabench.seeds).
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
        """Put a meter's reading (:class:`lorabench.meters.Reading`) into the record: its figures, their
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
        """Rebuild from stored ``extra_info``.

        Raises:
            ValueError: the data is not a lorabench record of a known schema.
        """
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"not a lorabench result of schema {SCHEMA_VERSION}: schema={data.get('schema')!r}")
        fields = {k: v for k, v in data.items() if k != "schema"}
        return cls(**fields)
