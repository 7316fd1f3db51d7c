"""Cases across devices and machines: pytest-xdist workers, CI shards, and what keeps them honest.

Three things decide how a run is split, and all three are plain functions of the collected
cases, so every xdist worker and every CI job computes the same answer:

- :func:`gate_groups`: configurations that a relative gate links (``qlora_nf4.eval_loss <=
  2.0 * lora.eval_loss``), or that a multi-process case scales against, form one group per
  model and data set. A group runs on one xdist worker in collection order (a scope of xdist's
  scope scheduler), so each relative gate sees its reference exactly as in a serial run;
  unlinked cases spread freely.
- :func:`pin_worker`: worker ``gwK`` of ``N`` sees one GPU (``CUDA_VISIBLE_DEVICES``), and on
  the CPU gets ``cores // N`` torch threads, so workers do not oversubscribe the cores.
- :func:`shard_items`: ``--shard I/N`` keeps the I-th of N slices of the run, whole groups at a
  time, balanced by case count; ``python -m lorabench merge`` joins the slices' stored runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lorabench.errors import ConfigError
from lorabench.paths import not_empty

# Deferred imports: pytest_benchmark, torch inside the functions that use them: what only reads a
# configuration or a stored run starts without them.

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ----- shards ------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Slice ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """Read ``--shard I/N``.

    Raises:
        ConfigError: not ``I/N`` with ``1 <= I <= N``.
    """
    match = _SHARD.match(not_empty(text, "--shard"))
    if not match:
        raise ConfigError(f"--shard {text!r}: write I/N, e.g. --shard 1/4 for the first of four slices")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"--shard {text!r}: I must be between 1 and N (N >= 1), got I={index}, N={count}")
    return Shard(index, count)


def shard_units(units: Sequence[Sequence[int]], count: int) -> list[list[int]]:
    """Assign work units (lists of item positions that must stay together) to ``count`` shards.

    Largest unit first, each to the shard with the fewest items so far (ties: the lower
    shard), so shards differ by at most one unit's size. Deterministic: every CI job that
    collects the same items computes the same assignment.

    Returns:
        For each shard, the item positions it runs, in collection order.
    """
    order = sorted(range(len(units)), key=lambda u: (-len(units[u]), min(units[u], default=0)))
    shards: list[list[int]] = [[] for _ in range(count)]
    for u in order:
        target = min(range(count), key=lambda s: (len(shards[s]), s))
        shards[target] += units[u]
    return [sorted(s) for s in shards]


def shard_items(groups: Sequence[str | None], shard: Shard) -> list[int]:
    """The positions of the items that ``shard`` runs.

    Args:
        groups: each collected item's group (:func:`gate_groups`), or ``None`` for an item
            that may run anywhere.

    Returns:
        Positions into ``groups``, in collection order.
    """
    units: dict[str, list[int]] = {}
    for position, group in enumerate(groups):
        units.setdefault(group if group is not None else f"\0{position}", []).append(position)
    return shard_units(list(units.values()), shard.count)[shard.index - 1]


# ----- groups ------------------------------------------------------------------
@dataclass(frozen=True)
class GatedItem:
    """What grouping needs to know of one collected item: where its gates look and its configuration id.

    ``scope`` is the model and data set (relative gates look only there); ``single_device`` is
    the configuration a multi-process case scales against, if it has one.
    """

    scope: str
    config_id: str
    single_device: str | None = None


def gate_groups(items: Sequence[GatedItem | None], rules: Iterable[tuple[str, str]]) -> list[str | None]:
    """Each item's group: the connected component of its configuration in the graph of relative gates.

    Args:
        items: one entry per collected item, ``None`` for items no gate links (non-parametrized tests).
        rules: (configuration or ``"*"``, referenced configuration) of every relative gate in the
            thresholds file, any profile (a superset only makes groups larger, never wrong).

    Returns:
        A group name per item, ``None`` where the item's component is the item alone.
    """
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    present: dict[str, list[str]] = {}
    for item in items:
        if item is not None:
            present.setdefault(item.scope, [])
            if item.config_id not in present[item.scope]:
                present[item.scope].append(item.config_id)
            find((item.scope, item.config_id))
    rules = list(rules)
    for scope, configs in present.items():
        for config, ref in rules:
            if ref not in configs:
                continue  # the reference does not run: the gate is "not evaluated" wherever the case runs
            for c in configs if config == "*" else [config] if config in configs else []:
                union((scope, c), (scope, ref))
    for item in items:
        if item is not None and item.single_device in present.get(item.scope, ()):
            union((item.scope, item.config_id), (item.scope, item.single_device))
    members: dict[tuple[str, str], list[str]] = {}
    for item in items:
        if item is not None:
            names = members.setdefault(find((item.scope, item.config_id)), [])
            if item.config_id not in names:
                names.append(item.config_id)
    out: list[str | None] = []
    for item in items:
        names = members[find((item.scope, item.config_id))] if item is not None else []
        out.append(_group_name(item.scope, names) if len(names) > 1 else None)
    return out


def _group_name(scope: str, config_ids: list[str]) -> str:
    """A readable group name: its configurations in collection order, and where (model|data set)."""
    return "+".join(config_ids) + (f" [{scope}]" if scope else "")


# ----- workers -----------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPin:
    """What one xdist worker was given: its GPU (``None`` on a CPU run) and its torch threads."""

    worker: str
    workers: int
    gpu: str | None
    threads: int


def worker_index(worker_id: str) -> int:
    """``gw3`` -> 3.

    Raises:
        ValueError: not an xdist worker id.
    """
    match = re.fullmatch(r"gw(\d+)", worker_id)
    if not match:
        raise ValueError(f"not a pytest-xdist worker id: {worker_id!r}")
    return int(match.group(1))


def visible_gpus(environ: dict[str, str], count_gpus: Callable[[], int]) -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` as given, else ``0..count-1``."""
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and not g.strip().startswith("-")]
    return [str(i) for i in range(count_gpus())]


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plan_pin(worker_id: str, workers: int, gpus: Sequence[str], cores: int, *, use_gpu: bool = True) -> WorkerPin:
    """One worker's share: GPU ``index % len(gpus)`` and ``max(1, cores // workers)`` threads.

    Args:
        use_gpu: ``False`` when the run is forced onto the CPU (``--device cpu``).
    """
    index = worker_index(worker_id)
    gpu = gpus[index % len(gpus)] if use_gpu and gpus else None
    return WorkerPin(worker_id, workers, gpu, max(1, cores // max(1, workers)))


def pin_worker(worker_id: str, workers: int, *, use_gpu: bool = True, environ: dict[str, str] | None = None) -> WorkerPin:
    """Give this xdist worker process its GPU and thread share, before anything initialises CUDA.

    The environment is inherited by the case processes the worker starts (the isolation
    forkserver, ``torchrun``), so they see the same GPU and thread count.

    Returns:
        What was set, recorded with the run.
    """
    environ = os.environ if environ is None else environ

    def count() -> int:
        import torch  # device_count() asks NVML and leaves CUDA uninitialised, so the mask below still applies

        return torch.cuda.device_count()

    pin = plan_pin(worker_id, workers, visible_gpus(environ, count) if use_gpu else [], cpu_cores(), use_gpu=use_gpu)
    if pin.gpu is not None:
        environ["CUDA_VISIBLE_DEVICES"] = pin.gpu
    for name in THREAD_ENV:
        environ[name] = str(pin.threads)
    import torch

    torch.set_num_threads(pin.threads)
    return pin


# ----- results across workers ----------------------------------------------------
class WorkerBenchmark:
    """A benchmark a worker measured, as the controller's pytest-benchmark session stores and shows it.

    pytest-benchmark keeps ``Metadata`` objects; under xdist the controller measures nothing
    itself, so each worker's ``Metadata.as_dict(include_data=True)`` travels back and this
    object answers the same calls (``as_dict``, ``has_error``, item access to the stats).
    """

    has_error = False

    def __init__(self, data: dict[str, Any], position: int = 0) -> None:
        self.data = data
        self.position = position  # in the collection: the controller stores benchmarks in serial order
        self.name = data["name"]
        self.fullname = data["fullname"]
        self.group = data.get("group")
        self.param = data.get("param")
        self.params = data.get("params")
        self.extra_info = data.get("extra_info", {})

    def __bool__(self) -> bool:
        return bool(self.data.get("stats", {}).get("rounds"))

    def __getitem__(self, key: str):
        stats = self.data.get("stats", {})
        return stats[key] if key in stats else getattr(self, key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except AttributeError:
            return default

    def as_dict(self, include_data: bool = True, flat: bool = False, stats: bool = True, cprofile=None) -> dict:
        out = {k: v for k, v in self.data.items() if k != "stats"}
        if stats:
            values = dict(self.data.get("stats", {}))
            if not include_data:
                values.pop("data", None)
            if flat:
                out.update(values)
            else:
                out["stats"] = values
        return out


def export_benchmark(metadata) -> dict[str, Any]:
    """A worker's benchmark as the plain JSON types pytest-benchmark would store (execnet carries only those)."""

    from pytest_benchmark.utils import safe_dumps

    return json.loads(safe_dumps(metadata.as_dict(include_data=True)))
