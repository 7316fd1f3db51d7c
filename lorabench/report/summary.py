"""The terminal summary: one table per model and data set, a baseline column, worded deltas.

A delta is the relative change of a value against the baseline's, signed the way the
numbers move: a memory reduction prints as ``-78.4%`` and reads "78.4% less". Whether
that is better or worse comes from the metric's direction in :mod:`lorabench.metrics`, and
it is said only where the data show a difference (:func:`difference_evidence`): a case run
at several seeds shows ``mean ± sd``, and findings name a case lowest or highest only when
its 95% interval is apart from every other's (:func:`ranking`). Speed is judged on the figure
that gates it, the step's time over its control: two cases differ only where the Hodges-Lehmann
bound of their per-step shift (:func:`lorabench.gates.compare.step_ratio_shift`, the statistic
``compare`` uses across runs) is past the speed tolerance; raw wall-clock step times are shown
beside it, and the summary says when workers or load make them incomparable.

Tables and findings are laid out to the terminal's width by :mod:`lorabench.report.tables`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from lorabench.report import tables
from lorabench.case_kinds import DEFAULT_KIND, Column, kind_name, kind_of
from lorabench.gates.compare import Tolerances, step_ratio_shift
from lorabench.report.failures import status_text, undecided_reason
from lorabench.matrix import BASELINE_ID
from lorabench.metrics import METRICS
from lorabench.result import STATUS_OK, CaseResult
from lorabench.evaluation.seeds import n_seeds, separated
from lorabench.gates.thresholds import EMBEDDED_SELECTOR, NOT_EVALUABLE, is_embedded_default

# Figures the seed cannot move (tensor shapes and bytes): a difference in them needs no repeated seeds.
SEED_INDEPENDENT_GROUPS = ("memory", "size")
# Telling two cases' steps apart within one run: compare's defaults (significance, minimum speed effect)
SPEED_TOLERANCES = Tolerances()
# Figures computed from the measured steps, so two cases' steps can tell them apart.
STEP_METRICS = ("step_ms", "step_control_ratio", "samples_per_s", "tokens_per_s", "train_s")

def relative_change(value: float, baseline: float) -> float | None:
    """(value - baseline) / |baseline|, or ``None`` when the baseline is 0."""
    if baseline == 0:
        return None
    return (value - baseline) / abs(baseline)


def format_delta(value: float, baseline: float) -> str:
    change = relative_change(value, baseline)
    if change is None:
        return "n/a"
    return f"{change * 100:+.1f}%"


def verdict(metric: str, value: float, baseline: float) -> str:
    """``better``, ``worse`` or ``same`` for a metric's move from the baseline."""
    better = METRICS[metric].better
    if value == baseline or better is None:
        return "same"
    improved = value < baseline if better == "lower" else value > baseline
    return "better" if improved else "worse"


def describe(metric: str, noun: str, value: float, baseline: float, evidence: str = "") -> str:
    """A phrase such as "51.6% less weight memory (3.01 vs 6.23 MiB, better)".

    Args:
        evidence: ``""`` to state the verdict (better / worse), or why the difference is not shown to be
            real ("not distinguishable at 3 seeds"), which then replaces the verdict.
    """
    change = relative_change(value, baseline)
    unit = METRICS[metric].unit
    figures = f"{fmt(value)} vs {fmt(baseline)}" + (f" {unit}" if unit not in ("ratio", "count") else "")
    if change is None or abs(change) < 0.0005:
        return f"the same {noun} ({figures})"
    if metric in ("tokens_per_s", "samples_per_s", "decode_tokens_per_s"):
        direction = "lower" if change < 0 else "higher"
    else:
        direction = "less" if change < 0 else "more"
    judged = f", {verdict(metric, value, baseline)}" if not evidence else f"; {evidence}"
    return f"{abs(change) * 100:.1f}% {direction} {noun} ({figures}{judged})"


def difference_evidence(metric: str, a: CaseResult, b: CaseResult) -> str:
    """``""`` when ``a`` and ``b`` are shown to differ in ``metric``; otherwise why not, in words.

    With repeated seeds on both sides, their 95% intervals must not overlap. With one seed, figures
    the seed cannot move (memory, sizes) count as they are; per-step timings differ only where the shift
    of ``a``'s step/control ratios over ``b``'s is past the speed tolerance with 95% confidence
    (:func:`speed_evidence`); anything else has no spread to judge by.
    """
    apart = separated(a, b, metric)
    if apart is not None:
        return "" if apart else f"not distinguishable at {min(n_seeds(a), n_seeds(b))} seeds, 95% intervals overlap"
    if METRICS[metric].group in SEED_INDEPENDENT_GROUPS:
        return ""
    if metric in STEP_METRICS and (a.step_ms_curve or b.step_ms_curve):
        return speed_evidence(a, b)
    return "one run each, spread unknown: --seeds N measures it"


def speed_evidence(a: CaseResult, b: CaseResult) -> str:
    """``""`` when ``a``'s steps are shown slower or faster than ``b``'s, otherwise why not.

    The figure that gates speed, each step's time over its control, is compared step by step: the
    one-sided 95% Hodges-Lehmann bound of the shift, in the direction it moved, must be past the
    speed tolerance (the minimum effect ``compare`` gates across runs), as in :mod:`lorabench.gates.compare`.
    """
    shift = step_ratio_shift(b, a, SPEED_TOLERANCES.alpha)
    if shift is None:
        return "too few measured steps with a control to tell the cases apart"
    tolerance = SPEED_TOLERANCES.for_metric(METRICS["step_control_ratio"])
    slower = shift.estimate > 0
    bound = shift.lower if slower else shift.upper
    if (bound > tolerance) if slower else (bound < -tolerance):
        return ""
    return (f"per-step shift {shift.estimate:+.1%}, {1 - SPEED_TOLERANCES.alpha:.0%} bound {bound:+.1%}: "
            f"not shown past the ±{tolerance:.0%} minimum effect")


def speed_phrase(r: CaseResult, base: CaseResult) -> str | None:
    """The step-time finding: step/control (the gated figure) with its verdict, raw wall-clock step time beside it."""
    m, b = r.metrics, base.metrics
    if "step_control_ratio" in m and "step_control_ratio" in b:
        text = describe("step_control_ratio", "step time over its control", m["step_control_ratio"],
                        b["step_control_ratio"], difference_evidence("step_control_ratio", r, base))
        if "step_ms" in m and "step_ms" in b:
            text += f" [raw step time {fmt(m['step_ms'])} vs {fmt(b['step_ms'])} ms, wall clock, not judged]"
        return text
    if "step_ms" in m and "step_ms" in b:
        return describe("step_ms", "step time", m["step_ms"], b["step_ms"], difference_evidence("step_ms", r, base))
    return None


def fmt(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def group_results(results: Iterable[CaseResult]) -> dict[tuple[str, str, str], list[CaseResult]]:
    """Results by (model, data set, device), in run order."""
    groups: dict[tuple[str, str, str], list[CaseResult]] = defaultdict(list)
    for r in results:
        suffix = "" if kind_name(r) == DEFAULT_KIND else f" {kind_name(r)}"
        groups[(r.model, r.dataset, r.device + suffix)].append(r)
    return groups


def pick_baseline(results: list[CaseResult]) -> CaseResult | None:
    """``full`` where it ran, otherwise the first case that ran."""
    ok = [r for r in results if r.status == STATUS_OK]
    for r in ok:
        if r.config_id == BASELINE_ID:
            return r
    return ok[0] if ok else None


def columns_for(result: CaseResult) -> tuple[Column, ...]:
    """The summary's columns for a record: its kind's, for its device (:mod:`lorabench.case_kinds`)."""
    return kind_of(result).columns(result.device)


def cell(result: CaseResult, metric: str) -> str:
    """A value: a mean over seeds with its standard deviation; accuracy with its 95% interval (over seeds: the
    mean's Student-t interval; one seed: Wilson), as its column's title says."""
    m = result.metrics
    if metric == "accuracy_pct" and metric in result.spread:
        spread = result.spread[metric]
        return f"{m[metric]:.1f} [{spread['ci_low']:.1f}-{spread['ci_high']:.1f}]"
    if metric in result.spread:
        return f"{fmt(m[metric])} ± {fmt(result.spread[metric]['sd'])}"
    if metric == "accuracy_pct" and "accuracy_ci_low_pct" in m and "accuracy_ci_high_pct" in m:
        return f"{m[metric]:.1f} [{m['accuracy_ci_low_pct']:.1f}-{m['accuracy_ci_high_pct']:.1f}]"
    return fmt(m[metric])


DELTA_SEPARATOR = " ("  # between a cell's value and its delta against the baseline


def table_cells(results: list[CaseResult]) -> list[list[str]]:
    """One group's table, header first; each cell shows the value and its delta against the baseline."""
    base = pick_baseline(results)
    cols = columns_for(results[0])
    rows = [["config", "status"] + [title for _, title, _ in cols]]
    for r in results:
        row = [r.config_id, status_text(r)]
        for metric, _, _ in cols:
            if metric not in r.metrics:
                row.append("-")
                continue
            text = cell(r, metric)
            if base is not None and r is not base and metric in base.metrics:
                text += f"{DELTA_SEPARATOR}{format_delta(r.metrics[metric], base.metrics[metric])})"
            row.append(text)
        rows.append(row)
    return rows


def render_table(results: list[CaseResult], width: int | None = None) -> list[str]:
    """One group's table in at most ``width`` columns (the terminal's when None), by :mod:`lorabench.report.tables`.

    Where one line per case does not fit, columns no case has a figure for are left out and each delta goes
    under its value, so that rich folds as little as it can.
    """
    width = tables.terminal_width() if width is None else width
    header, *rows = table_cells(results)
    left_out: list[str] = []
    if _natural_width([header, *rows]) > width:
        keep = [i for i in range(len(header)) if i < 2 or any(row[i] != "-" for row in rows)]
        header = [header[i] for i in keep]
        rows = [[row[i].replace(DELTA_SEPARATOR, "\n(", 1) for i in keep] for row in rows]
        metrics = ["", ""] + [metric for metric, _, _ in columns_for(results[0])]
        metrics = [metrics[i] for i in keep]
        for name in DROPPED_FIRST:
            if _natural_width([header, *rows]) <= width:
                break
            if name in metrics:
                i = metrics.index(name)
                left_out.append(header[i])
                del metrics[i], header[i]
                rows = [row[:i] + row[i + 1:] for row in rows]
    lines = tables.render_table(header, rows, width=width)
    if left_out:
        lines += tables.wrap(f"(left out at {width} columns: {', '.join(left_out)}; reports/ and a wider terminal "
                             "show them)", width=width)
    return lines


# The columns a narrow terminal loses first: figures another column implies or that never gate.
DROPPED_FIRST = ("perplexity", "train_loss_final", "tokens_per_s", "peak_rss_delta_mib", "forgetting_nats",
                 "step_ms", "weights_mib")


def _natural_width(table: list[list[str]]) -> int:
    """Columns a table takes with no cell folded: each column's widest cell line or header word, and the
    two spaces lorabench.report.tables puts between columns."""
    def widest(i: int) -> int:
        header_word = max(len(word) for word in table[0][i].split()) if table[0][i].strip() else 0
        return max([header_word] + [len(part) for row in table[1:] for part in row[i].split("\n")])
    return sum(widest(i) + 2 for i in range(len(table[0])))


def findings(results: list[CaseResult]) -> list[str]:
    """Key findings computed from the data: each case against the baseline, and which case is best at what.

    A difference is called better or worse, and a case lowest or highest, only where the data show it
    (:func:`difference_evidence`, :func:`ranking`); otherwise the finding says why it cannot tell.
    """
    if results and kind_name(results[0]) == "quant_error":
        return [f"{r.config_id}: NF4 vs FP4: " + describe("nf4_rel_error_mean", "reconstruction error",
                                                          r.metrics["nf4_rel_error_mean"], r.metrics["fp4_rel_error_mean"])
                for r in results if "nf4_rel_error_mean" in r.metrics and "fp4_rel_error_mean" in r.metrics]
    base = pick_baseline(results)
    if base is None:
        return []
    out = []
    peaks = [(metric, noun) for metric, _, noun in columns_for(base)
             if METRICS[metric].group == "memory" and metric != "weights_mib"]
    compared = (*peaks, ("weights_mib", "weight memory"))
    for r in results:
        if r is base or r.status != STATUS_OK:
            continue
        phrases = [
            describe(metric, noun, r.metrics[metric], base.metrics[metric], difference_evidence(metric, r, base))
            for metric, noun in compared
            if metric in r.metrics and metric in base.metrics
        ]
        phrases += [p for p in [speed_phrase(r, base)] if p]
        phrases += [describe(metric, noun, r.metrics[metric], base.metrics[metric], difference_evidence(metric, r, base))
                    for metric, noun in (("decode_tokens_per_s", "decode rate"), ("latency_ms", "latency"))
                    if metric in r.metrics and metric in base.metrics]
        if phrases:
            out.append(f"{r.config_id} vs {base.config_id}: " + "; ".join(phrases))
    ok = [r for r in results if r.status == STATUS_OK]
    for metric, noun, most in (("eval_loss", "eval loss", "lowest"), ("accuracy_pct", "accuracy", "highest"),
                               ("forgetting_nats", "forgetting", "least")):
        line = ranking(ok, metric, noun, most)
        if line:
            out.append(line)
    return out


def _interval(result: CaseResult, metric: str) -> tuple[float, float] | None:
    """The 95% interval of a metric: over seeds, or for accuracy of one seed its Wilson interval."""
    if metric in result.spread:
        return result.spread[metric]["ci_low"], result.spread[metric]["ci_high"]
    m = result.metrics
    if metric == "accuracy_pct" and "accuracy_ci_low_pct" in m and "accuracy_ci_high_pct" in m:
        return m["accuracy_ci_low_pct"], m["accuracy_ci_high_pct"]
    return None


def _value(result: CaseResult, metric: str) -> str:
    percent = METRICS[metric].unit == "%"
    show = (lambda x: f"{x:.1f}") if percent else fmt
    unit = "%" if percent else f" {METRICS[metric].unit}"
    text = f"{show(result.metrics[metric])}{unit}"
    interval = _interval(result, metric)
    if interval is not None:
        low, high = interval
        over = (f" over {n_seeds(result)} seeds" if metric in result.spread
                else f", Wilson, n={result.metrics.get('accuracy_n', 0):.0f}")
        text += f", 95% interval {show(low)}-{show(high)}{'%' if percent else ''}{over}"
    if metric == "accuracy_pct" and "accuracy_gain_pp" in result.metrics:
        text += f", {result.metrics['accuracy_gain_pp']:+.1f} pp over the base model"
    return text


def ranking(results: list[CaseResult], metric: str, noun: str, most: str) -> str | None:
    """Which case is best in ``metric`` (``most``: "lowest", "highest"), said only where its interval is
    apart from every other's.

    Returns:
        ``None`` with fewer than two cases measuring it.
    """
    scored = [r for r in results if metric in r.metrics]
    if len(scored) < 2:
        return None
    best_first = sorted(scored, key=lambda r: r.metrics[metric], reverse=METRICS[metric].better == "higher")
    best, rest = best_first[0], best_first[1:]
    if best.metrics[metric] == best_first[-1].metrics[metric]:
        return f"the same {noun} in every case ({_value(best, metric).split(',')[0]})"
    intervals = [_interval(r, metric) for r in best_first]
    if any(i is None for i in intervals):
        values = ", ".join(f"{r.config_id} {fmt(r.metrics[metric])}" for r in best_first)
        return (f"{noun} from one seed each, so no case is shown to have the {most} (--seeds N measures the "
                f"spread): {values} {METRICS[metric].unit}")
    low, high = intervals[0]
    ties = [r.config_id for r, (lo, hi) in zip(rest, intervals[1:]) if lo <= high and low <= hi]
    if not ties:
        return f"{most} {noun}: {best.config_id} ({_value(best, metric)})"
    seeds = n_seeds(best)
    at = f"at {seeds} seeds" if metric in best.spread else "(95% intervals overlap)"
    return (f"{best.config_id} has the {most} {noun} ({_value(best, metric)}) but is not distinguishable {at} "
            f"from {', '.join(ties)}")


def adapter_lines(results: list[CaseResult]) -> list[str]:
    """One line per case with an adapter check: size on disk, trainable parameters, reload and merge parity."""
    lines = []
    for r in results:
        m = r.metrics
        if "adapter_mib" not in m:
            continue
        parts = [f"{r.config_id}: {fmt(m['adapter_mib'])} MiB on disk"]
        if "params_trainable" in m:
            parts.append(f"{m['params_trainable']:,.0f} trainable parameters")
        if "reload_max_abs_diff" in m:
            parts.append(f"reloaded vs trained max |logit diff| {m['reload_max_abs_diff']:.3g}")
        if "merge_max_abs_diff" in m and "merge_argmax_agree_pct" in m:
            parts.append(f"merged vs unmerged max |logit diff| {m['merge_max_abs_diff']:.3g}, "
                         f"same greedy token at {fmt(m['merge_argmax_agree_pct'])}% of positions")
        lines.append(", ".join(parts))
    return lines


def tensor_lines(results: list[CaseResult]) -> list[str]:
    """One line per case with a tensor peak: the peak and its non-zero parts, largest first."""
    peak = "tensor_peak_mib"
    parts_of = [name for name in METRICS if name.startswith("tensor_") and name != peak]
    lines = []
    for r in results:
        m = r.metrics
        if peak not in m:
            continue
        parts = sorted(((m[name], name.removeprefix("tensor_").removesuffix("_mib")) for name in parts_of if name in m),
                       reverse=True)
        shown = " + ".join(f"{category} {fmt(mib)}" for mib, category in parts if mib >= 0.005)
        lines.append(f"{r.config_id}: {fmt(m[peak])} MiB = {shown}")
    return lines


def rank_lines(results: list[CaseResult]) -> list[str]:
    """One line per multi-process case: each rank's peak and weights, throughput in total and per device,
    and the scaling efficiency against the single-device case (lorabench/run/distributed.py)."""
    lines = []
    for r in results:
        ranks = r.details.get("ranks")
        if not ranks:
            continue
        peak = (("peak_alloc_mib", "peak alloc") if r.device.startswith("cuda")
                else ("peak_rss_delta_mib", "peak RSS+"))
        parts = [f"{r.config_id} ({r.details.get('strategy')}, {len(ranks)} ranks): per rank "
                 + ", ".join(f"{label} {'/'.join(fmt(k[metric]) for k in ranks)} MiB"
                             for metric, label in (peak, ("weights_mib", "weights")) if all(metric in k for k in ranks))]
        m = r.metrics
        if "tokens_per_s" in m and "tokens_per_s_per_device" in m:
            parts.append(f"{fmt(m['tokens_per_s'])} tokens/s in total, {fmt(m['tokens_per_s_per_device'])} per device")
        if "scaling_efficiency_pct" in m:
            parts.append(f"scaling efficiency {m['scaling_efficiency_pct']:.0f}% of linear")
        elif "scaling_efficiency_pct" in r.absent:
            parts.append(f"scaling efficiency not measured: {r.absent['scaling_efficiency_pct']}")
        lines.append("; ".join(parts))
    return lines


PHASES = (("load", "load"), ("eval_before", "eval before"), ("train", "train"), ("eval_after", "eval after"),
          ("adapter_check", "adapter check"))


def phase_lines(results: list[CaseResult]) -> list[str]:
    """Where each case's wall time went, phase by phase (informational: wall clock under the run's load)."""
    lines = []
    for r in results:
        parts = [f"{label} {r.metrics[f'phase_{key}_s']:.1f}" for key, label in PHASES
                 if f"phase_{key}_s" in r.metrics]
        if parts:
            lines.append(f"{r.config_id}: " + ", ".join(parts))
    return lines


def undecided_gate_lines(results: list[CaseResult]) -> list[str]:
    """One line per rule the data could not decide, with the cases it was not evaluable in and why."""
    cases: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for r in results:
        for g in r.gates:
            if g["status"] == NOT_EVALUABLE:
                # the reason without the case's own value where cases share it (the same data set, the same steps)
                cases[(g["rule"], g["where"], undecided_reason(g))].append(r.config_id)
    return [f"'{rule}' [{where}] in {', '.join(ids)}: {reason}" for (rule, where, reason), ids in cases.items()]


def raw_time_notes(results: list[CaseResult], workers: int | None = None) -> list[str]:
    """Why raw wall-clock times of this group cannot be compared between its cases, where they cannot."""
    notes = []
    cores = max((r.environment.get("cpu_count") or 0 for r in results), default=0)
    if workers and workers > 1:
        notes.append(f"{workers} pytest-xdist workers (-n {workers}) trained cases at the same time"
                     + (f" on {cores} cores" if cores else ""))
    loads = [r.environment[k] for r in results for k in ("load_avg_1m_start", "load_avg_1m_end")
             if isinstance(r.environment.get(k), (int, float))]
    if loads and cores and max(loads) > cores:
        notes.append(f"the 1-minute load average reached {max(loads):.1f} on {cores} cores")
    if not notes:
        return []
    return [f"raw step ms and tokens/s are wall clock and not comparable between these cases: {'; '.join(notes)}. "
            "Compare step/control, which the control timed in the same process cancels the shared load from."]


def profile_lines(results: list[CaseResult]) -> list[str]:
    """For a run on one's own model or data: which gate profiles applied, and how to write one's own."""
    if not results or is_embedded_default(results[0].model, results[0].dataset):
        return []
    applied = list(dict.fromkeys(g["profile"] for r in results for g in r.gates if g.get("profile")))
    if not applied:
        return []
    return [f"gate profiles applied: {', '.join(applied)}; the '{EMBEDDED_SELECTOR}' profile's task-specific "
            "bounds hold for a tiny zoo model on digit-reverse only. To gate your own model with your own bounds, "
            f"add a profile 'model={results[0].model}' to a copy of thresholds.yaml and run with --thresholds FILE "
            "(docs/gate-profiles.md)."]


# the lists under a group's table: (title, what lists the items), in the order they print
_SECTIONS = (
    ("findings:", findings),
    ("gates not evaluable (too little data to decide them; neither passed nor failed):", undecided_gate_lines),
    ("memory at the tensor peak, MiB (live tensor bytes; lorabench/meters/tensor_tracker.py):", tensor_lines),
    ("adapters (saved, reloaded, merged; lorabench/models/adapters.py):", adapter_lines),
    ("multi-process cases (per-device figures are the largest rank's; wall clock):", rank_lines),
    ("seconds per phase (wall clock):", phase_lines),
)


def render_summary(results: list[CaseResult], gate_counts: dict[str, int] | None = None, *,
                   width: int | None = None, workers: int | None = None) -> list[str]:
    """The terminal summary: per model and data set a table and the lists under it, at most ``width``
    columns a line (the terminal's when None).

    Args:
        workers: pytest-xdist workers the run had (``-n``), which make raw wall times incomparable.
    """
    width = tables.terminal_width() if width is None else width
    wrap = lambda text, indent="": tables.wrap(text, width=width, indent=indent)  # noqa: E731
    lines: list[str] = []
    for (model, dataset, device), group in group_results(results).items():
        base = pick_baseline(group)
        base_text = f"baseline {base.config_id}" if base else "no baseline (no case ran)"
        dtypes = sorted({str(r.config["dtype"]) for r in group if r.config.get("dtype")})
        dtype_text = f", trained in {'/'.join(dtypes)}" if dtypes else ""
        seeds = max(n_seeds(r) for r in group)
        spread = f"; {seeds} seeds: mean ± standard deviation" if seeds > 1 else ""
        lines += wrap(f"{model} on {dataset} ({device}{dtype_text}), {base_text}; "
                      f"deltas are (value - baseline) / baseline{spread}")
        lines += render_table(group, width)
        for note in raw_time_notes(group, workers):
            lines += wrap(note, "  ")
        not_ok = [r for r in group if r.status != STATUS_OK]
        for r in not_ok:
            lines += wrap(f"{r.config_id}: {r.status}: {r.error or ''}".rstrip(), "  ")
        for title, section in _SECTIONS:
            items = section(group)
            if items:
                lines += wrap(title)
                for item in items:
                    lines += tables.wrap(item, width=width, indent="  - ", subsequent="    ")
        for line in profile_lines(group):
            lines += wrap(line)
        lines.append("")
    if gate_counts:
        lines += wrap("gates: " + ", ".join(f"{n} {status}" for status, n in gate_counts.items()))
    return lines
