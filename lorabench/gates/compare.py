"""Compare two stored runs metric by metric, the way a regression gate needs.

Every metric of every case is compared, not only timings. Whether a move is a
regression comes from the metric's direction in :mod:`lorabench.metrics`; how large a
move counts comes from a tolerance per metric, per group or by default, written under
``compare:`` in thresholds.yaml::

    compare:
      alpha: 0.05           # 1 - confidence of the per-step timings' shift bound (Hodges-Lehmann)
      tolerance_pct:        # relative change that still counts as unchanged
        default: 5
        speed: 15           # a group: memory, speed, quality, size, ...
        load_s: 50          # a metric

Speed is gated on ``step_control_ratio``: each step's time over the fixed control workload timed
just before it in the same process (:mod:`lorabench.meters.control`), so a machine that got busier
between two runs does not read as a slower code path. A move counts only when the median ratio
moved beyond the tolerance (the minimum effect size) *and* the shift of the per-step ratios is
beyond it with confidence 1 - alpha: the one-sided bound of the Hodges-Lehmann interval (the
inversion of the Mann-Whitney U test) must lie past the tolerance, so a shift that the steps'
own spread cannot tell from the minimum effect does not gate. Raw wall-clock figures (``step_ms``, throughputs,
``train_s``) and one-shot wall times (``load_s``, ``adapter_check_s``, phases) are compared and
shown, but informational: they do not gate. Any other metric of a case run at several seeds
(``--seeds``) is judged against the seeds' spread: beyond the tolerance *and* significant in a
t-test over the per-seed values.

The ratio cancels whatever slows the step and the control alike (a torch, autograd or BLAS change):
when ``control_ms`` itself moved past its tolerance, the comparison warns that the yardstick moved,
by how much, beside the raw step CPU time's change, and names differing library versions.
``gate_step_cpu_time`` (``compare --gate-step-cpu-time``) gates on the raw ``step_cpu_ms`` too, with the
same per-step bound, for runners known to be quiet. A stored value that is not a finite number
(:data:`lorabench.result.INVALID_STORED`) is a regression in B wherever it stands.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from lorabench.errors import ThresholdError
from lorabench.storage.history import StoredRun
from lorabench.metrics import METRICS, Metric
from lorabench.result import INVALID_STORED, STATUS_OK, CaseResult
from lorabench.evaluation.seeds import seed_values
from lorabench.meters.control import paired_ratios, ratio_in_cpu_time

# Deferred imports: scipy inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

DEFAULT_TOLERANCE_PCT = {"default": 5.0, "memory": 10.0, "speed": 15.0, "quality": 5.0, "size": 0.0}
DEFAULT_ALPHA = 0.05
# Judged on the per-step samples as well as on the median: the step/control ratio of each step (and the
# step's raw CPU time, where it gates: Tolerances.gate_step_cpu_time).
PER_STEP_METRICS = ("step_control_ratio", "step_cpu_ms")
RAW_CPU_METRIC = "step_cpu_ms"
MIN_ROUNDS_FOR_TEST = 3
# Facts about the machine or the run that change what a figure means.
MACHINE_KEYS = ("cpu", "cpu_isa", "cpu_count", "gpu_name", "gpu_count", "cuda_version", "python", "isolate",
                "torch_threads", "omp_wait_policy", "xdist_workers", "cpu_threads", "control_version")
LOAD_KEYS = ("load_avg_1m_start", "load_avg_1m_end")
LOAD_DIFFERENCE = 1.0  # runnable processes: on a 2-core machine one more busy process halves a step's share

REGRESSED, IMPROVED, UNCHANGED, CHANGED, NEW = "regressed", "improved", "unchanged", "changed", "new"


@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances (percent) by metric, group and default, and the significance level."""

    pct: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE_PCT))
    alpha: float = DEFAULT_ALPHA
    # gate on the raw step CPU time as well as on the step/control ratio: a quiet runner's choice
    gate_step_cpu_time: bool = False

    def gates(self, metric: Metric) -> bool:
        """Whether a move of ``metric`` can be a regression."""
        return metric.better is not None and (metric.gated or self.gate_step_cpu_time and metric.name == RAW_CPU_METRIC)

    def for_metric(self, metric: Metric) -> float:
        for key in (metric.name, metric.group, "default"):
            if key in self.pct:
                return self.pct[key] / 100.0
        return DEFAULT_TOLERANCE_PCT["default"] / 100.0


def parse_tolerances(section: dict[str, Any], where: str) -> Tolerances:
    """Validate the ``compare:`` section of a thresholds file.

    Raises:
        ThresholdError: an unknown key, an unknown metric or group, or a value that is not a number >= 0.
    """
    allowed = ("alpha", "tolerance_pct")
    for key in section:
        if key not in allowed:
            raise ThresholdError(f"{where}: compare: unknown key {key!r}; allowed: {', '.join(allowed)}")
    alpha = section.get("alpha", DEFAULT_ALPHA)
    if not _is_number(alpha) or not 0 < alpha < 1:
        raise ThresholdError(f"{where}: compare.alpha: {alpha!r} must be a number between 0 and 1")
    given = section.get("tolerance_pct", {})
    if not isinstance(given, dict):
        raise ThresholdError(f"{where}: compare.tolerance_pct must be a mapping of metric, group or 'default' to percent")
    groups = {m.group for m in METRICS.values()}
    pct = dict(DEFAULT_TOLERANCE_PCT)
    for key, value in given.items():
        if key != "default" and key not in groups and key not in METRICS:
            raise ThresholdError(
                f"{where}: compare.tolerance_pct: unknown key {key!r}; use 'default', a group "
                f"({', '.join(sorted(groups))}) or a metric name"
            )
        if not _is_number(value) or value < 0:
            raise ThresholdError(f"{where}: compare.tolerance_pct.{key}: {value!r} must be a number >= 0 (percent)")
        pct[key] = float(value)
    return Tolerances(pct=pct, alpha=float(alpha))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Row:
    """One metric of one case in run A and run B."""

    case_id: str
    metric: str
    a: float | None
    b: float | None
    change_pct: float | None
    tolerance_pct: float | None
    status: str
    note: str = ""


@dataclass
class Comparison:
    run_a: str
    run_b: str
    rows: list[Row]
    warnings: list[str]
    # case id -> the configuration fields that differ between the runs (config_changes)
    changed_configs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.status == REGRESSED]

    def to_dict(self) -> dict[str, Any]:
        return {"run_a": self.run_a, "run_b": self.run_b, "warnings": self.warnings,
                "changed_configs": self.changed_configs, "rows": [asdict(r) for r in self.rows]}


def compare_runs(a: StoredRun, b: StoredRun, tolerances: Tolerances | None = None) -> Comparison:
    """Every case and metric of run ``b`` against run ``a``."""
    tolerances = tolerances or Tolerances()
    rows: list[Row] = []
    for case_id in sorted(set(a.results) | set(b.results)):
        rows += compare_cases(case_id, a.results.get(case_id), b.results.get(case_id), tolerances)
    changed = {case_id: changes for case_id in sorted(set(a.results) & set(b.results))
               if (changes := config_changes(a.results[case_id], b.results[case_id]))}
    warnings = machine_warnings(a.machine, b.machine) + config_warnings(changed) + yardstick_warnings(a, b, tolerances)
    warnings += [f"run {label}: {line}" for label, run in (("A", a), ("B", b)) for line in run.read_warnings]
    return Comparison(a.label, b.label, rows, warnings, changed)


def yardstick_warnings(a: StoredRun, b: StoredRun, tolerances: Tolerances) -> list[str]:
    """A line when the control workload (the speed gate's yardstick) moved past its tolerance between the runs.

    The step/control ratio cancels what slows the step and the control alike, so such a slowdown passes
    the ratio's gate: the line says by how much the control moved and how the raw step CPU time moved
    beside it, and names the library versions that differ.
    """
    tol = tolerances.for_metric(METRICS["control_ms"])
    moved = []  # (case, control change, step CPU time change or None)
    for case_id in sorted(set(a.results) & set(b.results)):
        ra, rb = a.results[case_id], b.results[case_id]
        change = _change(ra, rb, "control_ms")
        if change is not None and abs(change) > tol:
            moved.append((case_id, change, _change(ra, rb, RAW_CPU_METRIC)))
    if not moved:
        return []
    case_id, control, cpu = max(moved, key=lambda m: abs(m[1]))
    ra, rb = a.results[case_id], b.results[case_id]
    line = (f"the yardstick moved: control_ms {control:+.1%} in {case_id} ({ra.metrics['control_ms']:.4g} -> "
            f"{rb.metrics['control_ms']:.4g} ms)" + (f" and in {len(moved) - 1} more case(s)" if len(moved) > 1 else "")
            + f", past its ±{tol:.0%} tolerance; step_control_ratio cancels what slowed the step and the control "
            "alike (a torch, autograd or BLAS change), so such a slowdown passes the speed gate; raw step CPU time "
            + (f"(step_cpu_ms) {cpu:+.1%} there" if cpu is not None else "not stored in both runs"))
    versions = sorted(k for k in set(a.machine) | set(b.machine)
                      if k.endswith("_version") and a.machine.get(k) != b.machine.get(k))
    if versions:
        line += "; the runs differ in " + ", ".join(
            f"{k} {a.machine.get(k)!r} -> {b.machine.get(k)!r}" for k in versions)
    if not tolerances.gate_step_cpu_time:
        line += "; on a quiet runner, --gate-step-cpu-time gates on the raw step CPU time too"
    return [line]


def _change(a: CaseResult, b: CaseResult, metric: str) -> float | None:
    """(B - A) / A of a metric both records hold, else ``None``."""
    if metric not in a.metrics or metric not in b.metrics:
        return None
    return _relative(a.metrics[metric], b.metrics[metric])


CONFIG_CHANGE = "configuration changed"  # how a warning and the case's rows name a case run with other fields


def config_changes(a: CaseResult, b: CaseResult) -> list[str]:
    """``rank 16 -> 32`` for each configuration field that differs between a case's two records (``dtype: auto``
    resolves per device, so even an unchanged matrix can train in bf16 on one machine and fp32 on another)."""
    keys = [k for k in dict.fromkeys([*a.config, *b.config]) if k != "id"]
    return [f"{k} {a.config.get(k)!r} -> {b.config.get(k)!r}".replace("'", "") for k in keys
            if a.config.get(k) != b.config.get(k)]


def config_warnings(changed: dict[str, list[str]]) -> list[str]:
    """A line for each case whose configuration differs between the runs (``changed``: case id -> its
    :func:`config_changes`), naming the fields: its moves compare two configurations, not two versions of the code."""
    return [f"{case_id}: {CONFIG_CHANGE} between the runs ({', '.join(changes)}): its speed, memory and quality "
            "moves compare two configurations, not two versions of the code" for case_id, changes in changed.items()]


def compare_cases(case_id: str, a: CaseResult | None, b: CaseResult | None, tolerances: Tolerances) -> list[Row]:
    """The rows of one case; a case that ran in A and not in B (or stopped working) is a regression."""
    if b is None:
        status = REGRESSED if a.status == STATUS_OK else CHANGED
        return [Row(case_id, "status", None, None, None, None, status, f"ran in A ({a.status}), absent from B: not selected, or stopped before its timed steps "
                    "(pytest-benchmark stores no run without timings)")]
    if a is None:
        return [Row(case_id, "status", None, None, None, None, NEW, f"only in B ({b.status})")]
    if a.status != b.status:
        status = REGRESSED if a.status == STATUS_OK else (IMPROVED if b.status == STATUS_OK else CHANGED)
        return [Row(case_id, "status", None, None, None, None, status,
                    f"{a.status} -> {b.status}" + (f": {b.error}" if b.error else ""))]
    if a.status != STATUS_OK:
        return [Row(case_id, "status", None, None, None, None, UNCHANGED, f"{a.status} in both")]
    rows = []
    for name in sorted(set(a.metrics) | set(b.metrics) | set(a.absent) | set(b.absent)):
        if name not in METRICS:
            continue  # a metric this version no longer records
        rows.append(_compare_metric(case_id, METRICS[name], a, b, tolerances))
    return rows


def _compare_metric(case_id: str, metric: Metric, a: CaseResult, b: CaseResult, tolerances: Tolerances) -> Row:
    va, vb = a.metrics.get(metric.name), b.metrics.get(metric.name)
    tol = tolerances.for_metric(metric)
    if vb is None and b.absent.get(metric.name, "").startswith(INVALID_STORED):
        return Row(case_id, metric.name, va, None, None, None, REGRESSED, f"B's {b.absent[metric.name]}")
    if va is None and vb is None:
        return Row(case_id, metric.name, None, None, None, None, UNCHANGED, "not measured in either run")
    if vb is None:
        return Row(case_id, metric.name, va, None, None, None, REGRESSED,
                   f"not measured in B: {b.absent.get(metric.name, 'no reason recorded')}")
    if va is None:
        return Row(case_id, metric.name, None, vb, None, None, NEW, "not measured in A")
    change = _relative(va, vb)
    row = Row(case_id, metric.name, va, vb, None if change is None else change * 100, tol * 100, UNCHANGED)
    moved = change is None and va != vb or change is not None and abs(change) > tol
    if not moved:
        return row
    if not tolerances.gates(metric):
        row.status = CHANGED
        if not metric.gated:
            row.note = "informational, not gated (wall clock: moves with the machine's load)"
        return row
    worse = (vb > va) if metric.better == "lower" else (vb < va)
    if metric.name in PER_STEP_METRICS:
        samples, what = ((measured_step_ratios, "step/control ratios") if metric.name == "step_control_ratio"
                         else (measured_step_cpu_ms, "raw step CPU times"))
        shift = step_shift(a, b, tolerances.alpha, samples)
        if shift is None:
            row.note = (f"fewer than {MIN_ROUNDS_FOR_TEST} paired steps in a run, or too few to bound the shift "
                        f"at alpha {tolerances.alpha:g}: not gated")
            row.status = CHANGED
            return row
        bound = shift.lower if worse else shift.upper
        row.note = (f"per-step shift {shift.estimate:+.1%}, {1 - tolerances.alpha:.0%} bound {bound:+.1%} "
                    f"(Hodges-Lehmann over {what})")
        cpu = _change(a, b, RAW_CPU_METRIC) if metric.name == "step_control_ratio" else None
        if cpu is not None:
            row.note += f"; raw step CPU time {cpu:+.1%}"
        if not (bound > tol if worse else bound < -tol):
            row.note += f": the steps' spread leaves it within the ±{tol:.0%} tolerance"
            return row
    elif (seed_p := _seed_p_value(metric.name, a, b)) is not None:
        p, how = seed_p
        row.note = f"{how} p={p:.3g}"
        if p >= tolerances.alpha:
            row.note += f" (within the seeds' spread at alpha {tolerances.alpha:g})"
            return row
    row.status = REGRESSED if worse else IMPROVED
    return row


def _seed_p_value(metric: str, a: CaseResult, b: CaseResult) -> tuple[float, str] | None:
    """Two-sided p-value that the two runs' per-seed values of ``metric`` share a mean, and the test used:
    Welch's t-test when both ran several seeds, a one-sample t-test of the repeated side against the
    other's single value when one did. ``None`` when neither ran several seeds, or the test is undefined
    (no variance on either side)."""

    from scipy.stats import ttest_1samp, ttest_ind


    va, vb = seed_values(a, metric), seed_values(b, metric)
    if len(va) < 2 and len(vb) < 2 or not va or not vb:
        return None
    if len(va) >= 2 and len(vb) >= 2:
        p, how = float(ttest_ind(va, vb, equal_var=False).pvalue), f"Welch t-test over {len(va)} and {len(vb)} seeds"
    else:
        many, one = (va, vb[0]) if len(va) >= 2 else (vb, va[0])
        p, how = float(ttest_1samp(many, one).pvalue), f"one-sample t-test against {len(many)} seeds"
    return None if math.isnan(p) else (p, how)


def _relative(a: float, b: float) -> float | None:
    if a == 0:
        return None if b != 0 else 0.0
    return (b - a) / abs(a)


def _measured(result: CaseResult, curve: str) -> list[list[float]]:
    """A per-step curve (``step_ms_curve``, ``control_ms_curve``) without the warm-up steps, one list per seed."""
    warmup = int(result.config.get("warmup_steps") or 0)
    curves = [s.get(curve, []) for s in result.seeds] if result.seeds else [getattr(result, curve)]
    return [list(c[warmup:]) for c in curves]


def measured_step_ratios(result: CaseResult) -> list[float]:
    """Step over its control of every measured (post-warm-up) step, of every seed that ran, in the clock the
    case's ``step_control_ratio`` used (CPU time on the CPU, wall time elsewhere); empty where no control
    was stored."""

    # (runs stored before the CPU-time curves existed have only the wall-time ones)
    cpu_time = ratio_in_cpu_time(result.device.split(":")[0]) and any(_measured(result, "control_cpu_ms_curve"))
    step_curve, control_curve = (("step_cpu_ms_curve", "control_cpu_ms_curve") if cpu_time
                                 else ("step_ms_curve", "control_ms_curve"))
    ratios = []
    for steps, controls in zip(_measured(result, step_curve), _measured(result, control_curve)):
        if not controls or len(controls) not in (len(steps), len(steps) + 1):
            return []
        ratios += paired_ratios(steps, controls)
    return ratios


class Shift(NamedTuple):
    """How much B's per-step ratios moved against A's, as a factor minus one (0.3: 30% slower)."""

    estimate: float  # Hodges-Lehmann: the median of every pairwise ratio B_j / A_i
    lower: float  # one-sided bounds, each at confidence 1 - alpha
    upper: float


def measured_step_cpu_ms(result: CaseResult) -> list[float]:
    """The case process's CPU time of every measured (post-warm-up) step, of every seed that ran."""
    return [ms for steps in _measured(result, "step_cpu_ms_curve") for ms in steps]


def step_ratio_shift(a: CaseResult, b: CaseResult, alpha: float) -> Shift | None:
    """The shift of B's step/control ratios over A's (:func:`step_shift`)."""
    return step_shift(a, b, alpha, measured_step_ratios)


def step_shift(a: CaseResult, b: CaseResult, alpha: float, samples) -> Shift | None:
    """The shift of B's per-step ``samples`` (a function of a record: its step/control ratios, its raw step
    CPU times) over A's with its confidence bounds, or ``None`` with too few steps.

    The bounds invert the one-sided Mann-Whitney U test (Hollander and Wolfe, Nonparametric Statistical
    Methods, 4.3): of the n*m sorted pairwise log differences, the C-th from either end, C being U's
    critical value at ``alpha`` (normal approximation). A bound past the tolerance means the shift is
    both significant and larger than the minimum effect.
    """
    from scipy.stats import norm

    sa, sb = samples(a), samples(b)
    n, m = len(sa), len(sb)
    if min(n, m) < MIN_ROUNDS_FOR_TEST:
        return None
    diffs = sorted(math.log(y) - math.log(x) for x in sa for y in sb)
    critical = round(n * m / 2 - norm.ppf(1 - alpha) * math.sqrt(n * m * (n + m + 1) / 12))
    if critical < 1:
        return None
    middle = len(diffs) // 2
    estimate = diffs[middle] if len(diffs) % 2 else (diffs[middle - 1] + diffs[middle]) / 2
    return Shift(math.expm1(estimate), math.expm1(diffs[critical - 1]), math.expm1(diffs[-critical]))


def machine_warnings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """A line for each machine fact or library version that differs between the runs, and for a load change."""
    keys = [k for k in MACHINE_KEYS if k in a or k in b]
    keys += sorted(k for k in set(a) | set(b) if k.endswith("_version") and k not in keys)
    warnings = [
        f"the runs differ in {key}: {a.get(key)!r} (A) vs {b.get(key)!r} (B); figures may not be comparable"
        for key in keys
        if a.get(key) != b.get(key)
    ]
    for label, machine in (("A", a), ("B", b)):  # a run joined from --shard slices (lorabench.commands.merge)
        warnings += [f"run {label} joins slices whose machines differ in {line}; its figures may not be comparable "
                     "with one another" for line in machine.get("merged_differences") or []]
    load_a, load_b = _peak_load(a), _peak_load(b)
    if load_a is not None and load_b is not None and abs(load_a - load_b) > LOAD_DIFFERENCE:
        warnings.append(
            f"the machine was busier in one run (1-minute load average up to {load_a:.1f} in A, {load_b:.1f} in B): "
            "timings reflect other work on the machine, not only the code"
        )
    return warnings


def _peak_load(machine: dict[str, Any]) -> float | None:
    loads = [machine[k] for k in LOAD_KEYS if isinstance(machine.get(k), (int, float))]
    return max(loads) if loads else None
