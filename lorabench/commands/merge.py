"""Join stored runs of one commit (the slices of ``--shard I/N`` jobs) into one stored run.

The joined file is a pytest-benchmark run like any other: ``python -m lorabench compare``,
``report``, the CI gate and stock ``pytest-benchmark compare`` read it. What differs between the
slices' machines (CPU, GPU, library versions, thread counts, worker counts) is flagged in the
joined run's ``machine_info["merged_differences"]``, which ``compare`` prints as warnings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabench.errors import HistoryError
from lorabench.errors import ConfigError
from lorabench.gates.compare import MACHINE_KEYS
from lorabench.run.scaleout import parse_shard
from lorabench.storage.history import RUN_FILE

LOAD_KEYS = ("load_avg_1m_start", "load_avg_1m_end")


@dataclass
class Merged:
    """The joined run and what was noticed while joining."""

    data: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _machine_keys(machines: list[dict[str, Any]]) -> list[str]:

    keys = [k for k in MACHINE_KEYS if any(k in m for m in machines)]
    keys += sorted({k for m in machines for k in m if k.endswith("_version")} - set(keys))
    return keys


def merge_runs(runs: list[tuple[str, dict[str, Any]]]) -> Merged:
    """Join stored runs.

    Args:
        runs: (label for messages, the run's pytest-benchmark JSON), at least two.

    Returns:
        The joined JSON: every benchmark of every run in the order given, the first run's
        ``machine_info`` with ``merged_from`` and ``merged_differences``, and the latest ``datetime``.

    Raises:
        HistoryError: fewer than two runs, runs of different commits, or a case in two runs.
    """
    if len(runs) < 2:
        raise HistoryError(f"merge needs at least two runs, got {len(runs)}")
    commits = {label: (data.get("commit_info") or {}).get("id") for label, data in runs}
    known = {c for c in commits.values() if c}
    if len(known) > 1:
        raise HistoryError("merge joins slices of one commit; these runs are of different commits: "
                           + ", ".join(f"{label} ({(c or 'none')[:12]})" for label, c in commits.items()))
    seen: dict[str, str] = {}
    benchmarks = []
    for label, data in runs:
        for bench in data["benchmarks"]:
            extra = bench.get("extra_info") or {}
            key = extra.get("case_id") or bench.get("fullname")
            if key in seen:
                raise HistoryError(f"case {key!r} is in {seen[key]} and in {label}: each case must run in one "
                                   "slice only (the same --shard I/N twice, or overlapping selections?)")
            seen[key] = label
            benchmarks.append(bench)
    machines = [data.get("machine_info") or {} for _, data in runs]
    machine = dict(machines[0])
    differences = []
    for key in _machine_keys(machines):
        values = [m.get(key) for m in machines]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            differences.append(f"{key}: " + ", ".join(f"{v!r} ({label})" for v, (label, _) in zip(values, runs)))
    for key in LOAD_KEYS:  # the busiest slice: compare warns on load from the peak
        loads = [m[key] for m in machines if isinstance(m.get(key), (int, float))]
        if loads:
            machine[key] = max(loads)
    shards = [m.get("shard") for m in machines]
    machine.pop("shard", None)
    machine["merged_from"] = [{"run": label, "shard": m.get("shard"), "datetime": data.get("datetime"),
                               "node": m.get("node")} for (label, data), m in zip(runs, machines)]
    machine["merged_differences"] = differences
    merged = dict(runs[0][1])
    merged.update(machine_info=machine, benchmarks=benchmarks,
                  datetime=max(str(data.get("datetime", "")) for _, data in runs))
    return Merged(merged, [f"the slices differ in {d}" for d in differences] + _missing(shards))


def _missing(shards: list[str | None]) -> list[str]:
    """A warning when the runs are slices of one ``--shard I/N`` split and some slice is not among them."""

    try:
        parsed = [parse_shard(s) for s in shards if s]
    except ConfigError:  # a label this version cannot read: nothing to check
        return []
    counts = {p.count for p in parsed}
    if len(parsed) != len(shards) or len(counts) != 1:
        return []
    count = counts.pop()
    missing = sorted(set(range(1, count + 1)) - {p.index for p in parsed})
    return [f"slices {', '.join(f'{i}/{count}' for i in missing)} are missing: the merged run is incomplete"] if missing else []


def default_output(storage: Path, data: dict[str, Any]) -> Path:
    """``<storage>/merged/NNNN_merged_<commit>.json``: the next number there, so the joined run is the
    latest stored run that ``compare`` and ``report`` pick by default."""

    folder = storage / "merged"
    numbers = [int(m.group(1)) for p in folder.glob("*.json") if (m := RUN_FILE.match(p.name))] if folder.is_dir() else []
    commit = ((data.get("commit_info") or {}).get("id") or "")[:12]
    return folder / f"{max(numbers, default=0) + 1:04d}_merged{'_' + commit if commit else ''}.json"
