"""What a run is about to do and how long it should take: the first line a bench run prints.

The estimate comes from the stored history when the same cases ran before on this storage (the
wall time of their phases in the latest such run), else from a rough model of the embedded tiny
models: training steps and fixed per-case work, each as a multiple of the control workload
timed right now (:mod:`lorabench.meters.control`), so it scales with this machine and its current load.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorabench.errors import HistoryError
from lorabench.storage.history import load_runs

log = logging.getLogger(__name__)

# Tiny zoo models, measured as multiples of one control pass (lorabench.meters.control, fp32, timed in the
# pytest process): a training step and the fixed work of a case (process start, load, evals, adapter
# check). Rough: the estimate says so. From `pytest bench/ -m qlora` on a 2-core AVX512-BF16 CPU
# (2026-12-02, one thread per case, gradient checkpointing on): steps of 120-160 ms and ~8 s of other
# work per case against a control of ~13 ms; 6 cases took 87-90 s (72 s without checkpointing).
ZOO_STEP_CONTROLS = 12.0
ZOO_FIXED_CONTROLS = 640.0
# Building a zoo model that is not cached yet (lorabench.models.zoo): one fp32 pre-training step of batch 32, in
# control passes. Same machine, 2026-12-02: tiny-llama built in 61.9 s (600 steps of ~103 ms).
ZOO_PRETRAIN_STEP_CONTROLS = 8.0
PHASE_PREFIX = "phase_"


def estimate_from_history(storage: Path | None, case_ids: list[str]) -> tuple[float, str] | None:
    """Seconds the latest stored run that holds every one of ``case_ids`` spent in their phases.

    Returns:
        (seconds, which run), or ``None`` when no stored run holds them all.
    """

    if storage is None or not storage.is_dir():
        return None
    try:
        runs = load_runs(storage)
    except HistoryError:
        return None
    for run in reversed(runs):
        if all(c in run.results for c in case_ids):
            total = sum(v for c in case_ids for k, v in run.results[c].metrics.items() if k.startswith(PHASE_PREFIX))
            if total > 0:
                return total, f"stored run {run.label}"
    return None


def estimate_from_control(steps: list[int], control_s: float) -> float:
    """A rough wall time for tiny-model cases of ``steps`` training steps each, from one control pass."""
    return sum(s * ZOO_STEP_CONTROLS * control_s + ZOO_FIXED_CONTROLS * control_s for s in steps)


def estimate_zoo_builds(pretrain_steps: list[int], control_s: float) -> float:
    """A rough wall time for building the zoo models of ``pretrain_steps`` pre-training steps each."""
    return sum(pretrain_steps) * ZOO_PRETRAIN_STEP_CONTROLS * control_s


def with_builds(estimate: tuple[float, str] | None, builds_s: float, names: list[str]) -> tuple[float, str] | None:
    """``estimate`` plus the time to build the zoo models ``names`` that are not cached yet."""
    if estimate is None or not names:
        return estimate
    return estimate[0] + builds_s, f"{estimate[1]}, plus the build of {', '.join(names)}, not cached yet"


def for_run(estimate: tuple[float, str] | None, *, seeds: int = 1, workers: int = 1) -> tuple[float, str] | None:
    """``estimate`` (each case once, one after another) for ``seeds`` runs of every case (``--seeds``) spread
    over ``workers`` pytest-xdist workers (``-n``), at best: a worker's cases may not take equal time."""
    if estimate is None:
        return None
    seconds, source = estimate
    if seeds > 1:
        seconds, source = seconds * seeds, f"{source}, x {seeds} seeds"
    if workers > 1:
        seconds, source = seconds / workers, f"{source}, over {workers} workers if they share the work evenly"
    return seconds, source


def plan_line(*, case_ids: list[str], models: list[str], datasets: list[str], device: str, dtypes: list[str],
              isolate: str, estimate: tuple[float, str] | None) -> str:
    """One line: how many cases on what, and the time it should take."""
    shown = ", ".join(case_ids[:8]) + (f", ... ({len(case_ids) - 8} more)" if len(case_ids) > 8 else "")
    when = (f"about {_duration(estimate[0])} (from {estimate[1]})" if estimate
            else "no estimate (no stored run of these cases, and not all models are embedded)")
    return (f"lorabench: {len(case_ids)} case(s) [{shown}] on {', '.join(models)} x {', '.join(datasets)}, "
            f"{device} in {'/'.join(dtypes)}, isolation {isolate}; expected {when}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
