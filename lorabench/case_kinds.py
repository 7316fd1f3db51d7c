"""Kinds of bench case, and what the session, the gates and the summary need to know of each.

A record says its kind in ``config["kind"]`` (fine-tuning records of the matrix carry none:
``finetune``). Each kind registers itself from its own module with :func:`register`: its
runner (the class that runs one of its cases through the case protocol,
:mod:`lorabench.kinds.protocol`), the case ids thresholds.yaml may name, the summary's columns,
whether the ``"*"`` rules of thresholds.yaml (written for fine-tuning) apply to it, and any
metric of its own that :mod:`lorabench.metrics` does not define. Nothing else names the kinds:
the launchers, the session, the gates and the summary ask this registry, so adding a kind is
adding its module.

lorabench's own kinds are imported on first use (:data:`BUILT_IN_MODULES`); a kind from
elsewhere registers when its module is imported (from a conftest, say).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lorabench.metrics import METRICS, Metric

Column = tuple[str, str, str]  # (metric, column title, noun for the summary's findings)

# The peak-memory columns the kinds share.
TENSOR_PEAK: Column = ("tensor_peak_mib", "tensor peak MiB", "peak memory (live tensor bytes)")
PROCESS_PEAK: Column = ("peak_rss_delta_mib", "process RSS+ MiB", "process memory (peak RSS added)")
CUDA_PEAK: Column = ("peak_alloc_mib", "peak alloc MiB", "peak GPU memory (allocator)")

DEFAULT_KIND = "finetune"
BUILT_IN_MODULES = ("lorabench.matrix", "lorabench.kinds.classify", "lorabench.kinds.inference", "lorabench.kinds.gguf",
                    "lorabench.kinds.quant_error")


@dataclass(frozen=True)
class CaseKind:
    """One kind of case.

    Args:
        name: what its records carry in ``config["kind"]``.
        case_ids: the ids of the cases of this kind that lorabench ships (thresholds.yaml may name them).
        columns: the summary table's columns for a record's device (``"cpu"``, ``"cuda:0"``).
        wildcard_rules: whether thresholds.yaml's ``"*"`` rules apply to its records.
        metrics: metrics of its own, added to :data:`lorabench.metrics.METRICS` (lorabench's kinds define
            theirs there).
        runner: where the class that runs one of its cases lives, ``"module:Class"``
            (:class:`lorabench.kinds.protocol.CaseRunner`); imported only when a case of the kind runs, so that
            the registry stays importable without torch. ``""`` for a kind whose records come from
            elsewhere (a stored record of a plugin's kind).
    """

    name: str
    case_ids: Callable[[], Iterable[str]]
    columns: Callable[[str], tuple[Column, ...]]
    wildcard_rules: bool = True
    metrics: tuple[Metric, ...] = ()
    runner: str = ""


_KINDS: dict[str, CaseKind] = {}
_built_ins_loaded = False


def register(kind: CaseKind) -> CaseKind:
    """Add ``kind`` and its metrics (a module calls this at import). Registering a name again replaces the kind.

    Raises:
        ValueError: one of its metrics has the name of a different metric already defined.
    """
    for metric in kind.metrics:
        defined = METRICS.setdefault(metric.name, metric)
        if defined != metric:
            raise ValueError(f"case kind {kind.name!r}: metric {metric.name!r} is already defined differently "
                             f"({defined})")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, CaseKind]:
    """Every registered kind, lorabench's own included, by name."""
    global _built_ins_loaded
    if not _built_ins_loaded:
        _built_ins_loaded = True
        for module in BUILT_IN_MODULES:
            importlib.import_module(module)
    return _KINDS


def kind_name(result) -> str:
    """The kind a record (:class:`lorabench.result.CaseResult`) says it is."""
    return result.config.get("kind", DEFAULT_KIND)


def kind_of(result) -> CaseKind:
    """The registered kind of a record; for a kind no module registered now (a stored record of a plugin
    not loaded), one with no columns of its own and only the rules that name its cases."""
    name = kind_name(result)
    return kinds().get(name) or CaseKind(name, case_ids=tuple, columns=lambda _device: (), wildcard_rules=False)


def known_case_ids() -> set[str]:
    """Every case id of every registered kind."""
    return {case_id for kind in kinds().values() for case_id in kind.case_ids()}
