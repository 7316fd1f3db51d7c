"""Stored runs: pytest-benchmark's JSON files read back as lorabench result records.

pytest-benchmark's file storage keeps one file per run, ``<storage>/<machine>/NNNN_<name>.json``
(``--benchmark-autosave`` names it after the commit). Each benchmark in it carries a
lorabench :class:`~lorabench.result.CaseResult` in ``extra_info``; its ``stats`` are the
timed training steps. This module finds those files, selects runs by number, file or
commit, and reads them without ever writing to the storage.

Reading checks what it reads (:func:`lorabench.result.read_record`): a value that cannot stand
is named with the file, the case and the metric in the run's ``read_warnings``, and a run that
was interrupted (marked so by the plugin, or stored by an older version with timings but no
record) is recognised and left out of every choice of runs, with the reason printed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabench.errors import HistoryError
from lorabench.result import FAILED_STATUSES, CaseResult, read_record

log = logging.getLogger(__name__)
RUN_FILE = re.compile(r"^(\d{4})_(.+)\.json$")
DEFAULT_STORAGE = Path(".benchmarks")
# The top-level key the plugin writes into the JSON of a run stopped by Ctrl-C (lorabench.pytest_plugin.hooks).
INTERRUPTED_KEY = "lorabench_interrupted"
# pytest-benchmark's timing statistics that a reader checks for NaN and infinity.
TIMING_STATS = ("min", "max", "mean", "median", "stddev", "q1", "q3", "iqr", "total")


class InterruptedRunError(HistoryError):
    """A stored run that was interrupted: never a point of comparison."""


@dataclass
class StoredRun:
    """One stored pytest-benchmark run and the lorabench results inside it."""

    path: Path
    number: int
    name: str
    datetime: str
    commit: dict[str, Any]
    machine: dict[str, Any]
    results: dict[str, CaseResult] = field(default_factory=dict)  # by case id
    # values read around (NaN, infinity, wrong types, unknown keys), each naming the file, case and key
    read_warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        commit = (self.commit.get("id") or "")[:10]
        return f"{self.number:04d}_{self.name}" + (f" ({commit})" if commit and commit not in self.name else "")


def run_files(storage: Path) -> list[Path]:
    """Every ``NNNN_*.json`` under ``storage`` (all machines), oldest first."""
    if not storage.is_dir():
        raise HistoryError(
            f"{storage}: no pytest-benchmark storage here; run the bench with --benchmark-autosave first "
            f"(or pass --storage DIR)"
        )
    files = [p for p in storage.rglob("*.json") if RUN_FILE.match(p.name)]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def read_json(path: Path) -> dict[str, Any]:
    """A stored run's JSON.

    Raises:
        HistoryError: unreadable, or not a pytest-benchmark run.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HistoryError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise HistoryError(f"{path}: not a pytest-benchmark run (no 'benchmarks' list)")
    return data


def interrupted_reason(data: dict[str, Any]) -> str | None:
    """Why a run's JSON is an interrupted run, or ``None``.

    A run is interrupted when the plugin marked it so (:data:`INTERRUPTED_KEY`), or, stored by a version
    before that mark, when no benchmark carries a lorabench record and one holds timings without any
    ``extra_info`` (pytest-benchmark saved the rounds of a case stopped mid-way).
    """
    if data.get(INTERRUPTED_KEY):
        return str(data[INTERRUPTED_KEY])
    benches = [b for b in data["benchmarks"] if isinstance(b, dict)]
    if any("schema" in (b.get("extra_info") or {}) for b in benches):
        return None
    stopped = [b for b in benches if not b.get("extra_info") and (b.get("stats") or {}).get("rounds")]
    if stopped:
        return (f"{stopped[0].get('name')!r} has {stopped[0]['stats']['rounds']} timed round(s) and no lorabench "
                "record: the run stopped mid-case")
    return None


def read_run(path: Path) -> StoredRun:
    """Read one stored run, checking every record (:func:`lorabench.result.read_record`).

    Raises:
        InterruptedRunError: the run was interrupted (:func:`interrupted_reason`).
        HistoryError: the file is not JSON, not a pytest-benchmark run, holds no lorabench result, or a record
            has a missing key or a field of the wrong type.
    """
    data = read_json(path)
    interrupted = interrupted_reason(data)
    if interrupted:
        raise InterruptedRunError(f"{path}: an interrupted run ({interrupted}); it is never compared or reported")
    match = RUN_FILE.match(path.name)
    run = StoredRun(
        path=path,
        number=int(match.group(1)) if match else 0,
        name=match.group(2) if match else path.stem,
        datetime=str(data.get("datetime", "")),
        commit=data.get("commit_info") or {},
        machine=data.get("machine_info") or {},
    )
    for bench in data["benchmarks"]:
        extra = (bench.get("extra_info") if isinstance(bench, dict) else None) or {}
        if not isinstance(extra, dict) or "schema" not in extra:
            continue  # a benchmark that is not a fine-tuning case (e.g. the harness overhead)
        try:
            result, findings = read_record(extra)
        except ValueError as exc:
            raise HistoryError(f"{path}: benchmark {bench.get('name')!r}: {exc}") from None
        run.results[result.case_id] = result
        run.read_warnings += [f"{path}: case {result.case_id}: {line}" for line in findings]
        run.read_warnings += [f"{path}: case {result.case_id}: {line}" for line in _timing_stat_problems(bench)]
    if not run.results:
        raise HistoryError(f"{path}: holds no lorabench result")
    return run


def _timing_stat_problems(bench: dict[str, Any]) -> list[str]:
    """pytest-benchmark's statistics of a benchmark that are NaN or infinite (they inform; the gate reads the curves)."""
    stats = bench.get("stats") if isinstance(bench.get("stats"), dict) else {}
    bad = [k for k in TIMING_STATS if isinstance(stats.get(k), float) and not math.isfinite(stats[k])]
    return [f"pytest-benchmark timing stat(s) {', '.join(f'{k}={stats[k]!r}' for k in bad)} not finite: "
            "stock `pytest-benchmark compare` misreads this run"] if bad else []


def load_runs(storage: Path = DEFAULT_STORAGE) -> list[StoredRun]:
    """Every readable run under ``storage``, oldest first; unreadable files are skipped with a warning."""
    runs = []
    for path in run_files(storage):
        try:
            runs.append(read_run(path))
        except HistoryError as exc:
            log.warning("skipping %s", exc)
    return runs


def select_run(spec: str, storage: Path = DEFAULT_STORAGE) -> StoredRun:
    """The run ``spec`` names: a file path, a run number (``3``, ``0003``), a name, or a commit id prefix.

    Raises:
        HistoryError: no run, or more than one, matches.
    """
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        return read_run(path)
    runs = load_runs(storage)
    if spec.isdigit() and len(spec) <= 4:
        matches = [r for r in runs if r.number == int(spec)]
    else:
        matches = [r for r in runs if r.name == spec or (len(spec) >= 4 and str(r.commit.get("id", "")).startswith(spec))
                   or r.path.name.startswith(spec)]
    if not matches:
        for unreadable in _files_named(spec, storage):  # named, but left out: say why
            read_run(unreadable)
        known = ", ".join(r.label for r in runs[-8:]) or "none"
        raise HistoryError(f"run {spec!r}: no stored run matches it in {storage} (latest runs: {known})")
    if len(matches) > 1 and len({r.commit.get("id") for r in matches}) > 1:
        raise HistoryError(
            f"run {spec!r} is ambiguous in {storage}: " + ", ".join(str(r.path) for r in matches)
            + "; pass the file path instead"
        )
    return matches[-1]


def _files_named(spec: str, storage: Path) -> list[Path]:
    """Stored run files whose number, name or file name ``spec`` gives (whether readable or not)."""
    named = []
    for path in run_files(storage):
        match = RUN_FILE.match(path.name)
        if (spec.isdigit() and len(spec) <= 4 and int(match.group(1)) == int(spec)) or match.group(2) == spec \
                or path.name.startswith(spec):
            named.append(path)
    return named


def failed_cases(run: StoredRun) -> list[CaseResult]:
    """The cases of a run that did not finish: diverged, errored or timed out."""
    return [r for r in run.results.values() if r.status in FAILED_STATUSES]


def run_problem(run: StoredRun) -> str | None:
    """Why a stored run is not a sound point of comparison (a case diverged or errored), or ``None``."""
    failed = failed_cases(run)
    if not failed:
        return None
    named = "; ".join(f"{r.case_id} {r.status}" + (f" ({r.error})" if r.error else "") for r in failed[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    return f"{len(failed)} case(s) did not finish: {named}{more}"


def latest_runs(count: int, storage: Path = DEFAULT_STORAGE, *, skip_broken: bool = False,
                skipped: list[str] | None = None) -> list[StoredRun]:
    """The ``count`` most recent runs, oldest first.

    An interrupted run is always passed over and noted in ``skipped``.

    Args:
        skip_broken: pass over runs that cannot be read or hold a case that did not finish
            (:func:`run_problem`); each one passed over is noted in ``skipped`` with the reason.
            Without it, a run that cannot be read stops the choice, and a run with failed cases
            is returned (for the caller to judge).

    Raises:
        HistoryError: fewer usable runs are stored, or (without ``skip_broken``) one of the latest
            cannot be read.
    """
    chosen: list[StoredRun] = []
    skipped = [] if skipped is None else skipped
    for path in reversed(run_files(storage)):
        if len(chosen) == count:
            break
        try:
            run = read_run(path)
        except InterruptedRunError as exc:  # never a point of comparison: passed over, with or without skip_broken
            skipped.append(str(exc))
            continue
        except HistoryError as exc:
            if not skip_broken:
                raise HistoryError(f"{exc}; pass --skip-broken to leave it out and use the runs before it") from None
            skipped.append(f"{path}: {str(exc).removeprefix(f'{path}: ')}")
            continue
        problem = run_problem(run) if skip_broken else None
        if problem:
            skipped.append(f"{run.label}: {problem}")
            continue
        chosen.append(run)
    if len(chosen) < count:
        kind = "usable" if skip_broken else "readable"
        raise HistoryError(
            f"{storage}: {len(chosen)} {kind} run(s) stored, {count} needed; run the bench with --benchmark-autosave"
            + "".join(f"\n  passed over: {line}" for line in skipped)
        )
    return chosen[::-1]
