"""Repeated seeds: which seeds a case runs with, one record from several runs, and when two differ.

``--seeds N`` runs every fine-tuning case N times, with the configuration's seed and the N - 1
after it; ``--seeds 1234,7,99`` runs those seeds. The seed sets data order, adapter
initialisation and dropout, and one 60-step run of the tiny model can move the QLoRA/LoRA
eval-loss ratio from 0.63 to 1.64 (docs/benchmarks.md): a difference between two
configurations means something only against that spread.

:func:`combine` folds the seeds' records into one: each metric's value is its mean over the
seeds, ``spread`` holds the standard deviation and a 95% Student-t interval of the mean, and
``seeds`` keeps every seed's own figures. Gates, reports and ``compare`` read the means like
any value, and :func:`separated` says whether two records' intervals are apart.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from lorabench.errors import ConfigError
from lorabench.result import STATUS_OK, STEP_CURVES, CaseResult

# Deferred imports: scipy inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

CONFIDENCE = 0.95
MAX_SEEDS = 100


@dataclass(frozen=True)
class SeedPlan:
    """``--seeds``: a count (the configuration's seed and the ones after it) or explicit seeds."""

    count: int = 1
    values: tuple[int, ...] = ()

    def for_seed(self, seed: int) -> list[int]:
        """The seeds a configuration whose own seed is ``seed`` runs with."""
        return list(self.values) if self.values else [seed + i for i in range(self.count)]

    @property
    def n(self) -> int:
        return len(self.values) or self.count


def parse_seeds(text: str | None) -> SeedPlan:
    """Read ``--seeds``: ``N`` (a count) or a comma-separated list of seeds (``1234,7,99``).

    Raises:
        ConfigError: not a count from 1 to 100, or a list with a non-integer, negative or repeated seed.
    """
    if text is None:
        return SeedPlan()
    raw = str(text).strip()
    if "," not in raw:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_SEEDS:
            raise ConfigError(f"--seeds {text!r}: give a count from 1 to {MAX_SEEDS} (e.g. --seeds 3) "
                              "or a comma-separated list of seeds (e.g. --seeds 1234,7,99)")
        return SeedPlan(count=int(raw))
    parts = [p.strip() for p in raw.split(",")]
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()  # a trailing comma ends the list: '5,' is the one seed 5, not a count
    if "" in parts:
        raise ConfigError(f"--seeds {text!r}: item {parts.index('') + 1} is empty; list seeds separated by single "
                          "commas (e.g. --seeds 1234,7,99)")
    bad = [p for p in parts if not p.isdigit() or int(p) >= 2**32]
    if bad or not parts:
        raise ConfigError(f"--seeds {text!r}: {bad[0] if bad else 'empty'!r} is not a seed; seeds are whole "
                          "numbers from 0 to 2**32 - 1")
    values = tuple(int(p) for p in parts)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"--seeds {text!r}: seed {repeated[0]} appears twice; each run needs its own seed")
    if len(values) > MAX_SEEDS:
        raise ConfigError(f"--seeds {text!r}: {len(values)} seeds; at most {MAX_SEEDS}")
    return SeedPlan(values=values)


def interval(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and the 95% Student-t interval of the mean.

    Raises:
        ValueError: fewer than two values (one run has no spread).
    """
    from scipy.stats import t

    n = len(values)
    if n < 2:
        raise ValueError("an interval needs at least two values")
    mean = statistics.fmean(values)
    sd = statistics.stdev(values)
    half = float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def _within_range(name: str, low: float, high: float) -> tuple[float, float]:
    """A share of a whole (accuracy, exact match, agreement in %) cannot leave 0-100, whatever a
    Student-t interval over two or three seeds reaches; other figures keep their interval."""
    if name.endswith("_pct") and any(word in name for word in ("accuracy", "exact_match", "agree")):
        return max(low, 0.0), min(high, 100.0)
    return low, high


def combine(runs: list[CaseResult]) -> CaseResult:
    """One record from a case's runs at several seeds (a single run is returned as it is).

    The status is ``ok`` when every seed ran; otherwise the first failing seed's status, its error
    naming the seed. Means and spreads come from the seeds that ran.
    """
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    ok = [r for r in runs if r.status == STATUS_OK]
    combined = CaseResult(
        case_id=first.case_id, config_id=first.config_id, model=first.model, dataset=first.dataset,
        device=first.device, config=dict(first.config), environment=dict(first.environment),
        details=dict(first.details), **{curve: list(getattr(first, curve)) for curve in STEP_CURVES},
    )
    failed = next((r for r in runs if r.status != STATUS_OK), None)
    if failed is not None:
        combined.status, combined.error = failed.status, f"seed {failed.config.get('seed')}: {failed.error}"
    combined.seeds = [{"seed": r.config.get("seed"), "status": r.status, "error": r.error, "metrics": dict(r.metrics),
                       **{curve: list(getattr(r, curve)) for curve in STEP_CURVES}} for r in runs]
    names = set().union(*(r.metrics for r in ok)) if ok else set()
    for name in sorted(names):
        values = [r.metrics[name] for r in ok if name in r.metrics]
        if len(values) < len(ok):
            missing = next(r for r in ok if name not in r.metrics)
            combined.set(name, None, reason=f"measured at {len(values)} of {len(ok)} seeds; seed "
                                            f"{missing.config.get('seed')}: {missing.absent.get(name, 'not recorded')}")
            continue
        if len(values) == 1:
            combined.set(name, values[0], source=first.sources.get(name, ""))
            continue
        mean, sd, low, high = interval(values)
        low, high = _within_range(name, low, high)
        source = first.sources.get(name)
        combined.set(name, mean, source=f"mean over {len(values)} seeds" + (f" of: {source}" if source else ""))
        combined.spread[name] = {"n": len(values), "sd": sd, "ci_low": low, "ci_high": high}
    for r in runs:
        for name, why in r.absent.items():
            if name not in combined.metrics:
                combined.absent.setdefault(name, why)
    return combined


def seed_values(result: CaseResult, metric: str) -> list[float]:
    """A metric's value at each seed that ran (one value for a single-seed record)."""
    if result.seeds:
        return [s["metrics"][metric] for s in result.seeds
                if s.get("status") == STATUS_OK and metric in s.get("metrics", {})]
    return [result.metrics[metric]] if metric in result.metrics else []


def n_seeds(result: CaseResult) -> int:
    return len(result.seeds) if result.seeds else 1


def separated(a: CaseResult, b: CaseResult, metric: str) -> bool | None:
    """Whether the 95% intervals of ``metric`` in ``a`` and ``b`` do not overlap.

    Returns:
        ``None`` when either record has no interval for it (a single seed).
    """
    sa, sb = a.spread.get(metric), b.spread.get(metric)
    if sa is None or sb is None:
        return None
    return sa["ci_high"] < sb["ci_low"] or sb["ci_high"] < sa["ci_low"]
