"""Stored runs: pytest-benchmark's JSON files read back as lorabench result records.

pytest-benchmark's file storage keeps one file per run, ``<storage>/<machine>/NNNN_<name>.json``
(``--benchmark-autosave`` names it after the commit). Each benchmark in it carries a
lorabench :class:`~lorabench.result.CaseResult` in ``extra_info``; its ``stats`` are the
timed training steps. This module finds those files, selects runs by number, file or
commit, and reads them without ever writing to the storage.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabench.errors import HistoryError
from lorabench.result import FAILED_STATUSES, CaseResult

log = logging.getLogger(__name__)
RUN_FILE = re.compile(r"^(\d{4})_(.+)\.json$")
DEFAULT_STORAGE = Path(".benchmarks")


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


def read_run(path: Path) -> StoredRun:
    """Read one stored run.

    Raises:
        HistoryError: the file is not JSON, not a pytest-benchmark run, or holds no lorabench result.
    """
    data = read_json(path)
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
        extra = bench.get("extra_info") or {}
        if "schema" not in extra:
            continue  # a benchmark that is not a fine-tuning case (e.g. the harness overhead)
        try:
            result = CaseResult.from_extra_info(extra)
        except (TypeError, ValueError) as exc:
            raise HistoryError(f"{path}: benchmark {bench.get('name')!r}: {exc}") from None
        run.results[result.case_id] = result
    if not run.results:
        raise HistoryError(f"{path}: holds no lorabench result")
    return run


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
        known = ", ".join(r.label for r in runs[-8:]) or "none"
        raise HistoryError(f"run {spec!r}: no stored run matches it in {storage} (latest runs: {known})")
    if len(matches) > 1 and len({r.commit.get("id") for r in matches}) > 1:
        raise HistoryError(
            f"run {spec!r} is ambiguous in {storage}: " + ", ".join(str(r.path) for r in matches)
            + "; pass the file path instead"
        )
    return matches[-1]


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
    for path in reversed(run_files(storage)):
        if len(chosen) == count:
            break
        try:
            run = read_run(path)
        except HistoryError as exc:
            if not skip_broken:
                raise HistoryError(f"{exc}; pass --skip-broken to leave it out and use the runs before it") from None
            if skipped is not None:
                skipped.append(f"{path}: {str(exc).removeprefix(f'{path}: ')}")
            continue
        problem = run_problem(run) if skip_broken else None
        if problem:
            if skipped is not None:
                skipped.append(f"{run.label}: {problem}")
            continue
        chosen.append(run)
    if len(chosen) < count:
        kind = "usable" if skip_broken else "readable"
        raise HistoryError(
            f"{storage}: {len(chosen)} {kind} run(s) stored, {count} needed; run the bench with --benchmark-autosave"
        )
    return chosen[::-1]
