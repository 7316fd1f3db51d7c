"""The terminal summary: one table per model and data set, a baseline column, worded deltas.

A delta is the relative change of a value against the baseline's, signed the way the
numbers move: a memory reduction prints as ``-78.4%`` and reads "78.4% less". Whether
that is better or worse comes from the metric's direction in :mod:`lorabench.metrics`, and
it is said only where the data show a difference (:func:`difference_evidence`): a case run
at several seeds shows ``mean ± sd``, and findings name a case lowest or highest only when
its 95% interval is apart from every other's (:func:`ranking`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from lorabench.case_kinds import DEFAULT_KIND, Column, kind_name, kind_of
from lorabench.failures import status_text
from lorabench.matrix import BASELINE_ID
from lorabench.metrics import METRICS
from lorabench.result import STATUS_OK, CaseResult
from lorabench.seeds import n_seeds, separated

# Figures the seed cannot move (tensor shapes and bytes): a difference in them needs no repeated seeds.
SEED_INDEPENDENT_GROUPS = ("memory", "size")
ALPHA = 0.05  # for telling two cases' per-step times apart within one run
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
    the seed cannot move (memory, sizes) count as they are; per-step timings are told apart by a
    Mann-Whitney test over the two cases' measured steps; anything else has no spread to judge by.
    """
    apart = separated(a, b, metric)
    if apart is not None:
        return "" if apart else f"not distinguishable at {min(n_seeds(a), n_seeds(b))} seeds, 95% intervals overlap"
    if METRICS[metric].group in SEED_INDEPENDENT_GROUPS:
        return ""
    if metric in STEP_METRICS:
        from scipy.stats import mannwhitneyu

        from lorabench.compare import measured_step_ms, measured_step_ratios

        # step/control ratios where both cases have them: the load can change between two cases of a run
        sa, sb, what = measured_step_ratios(a), measured_step_ratios(b), "step/control ratios"
        if min(len(sa), len(sb)) < 3:
            sa, sb, what = measured_step_ms(a), measured_step_ms(b), "step times"
        if min(len(sa), len(sb)) >= 3:
            p = float(mannwhitneyu(sa, sb, alternative="two-sided").pvalue)
            return "" if p < ALPHA else f"{what} not distinguishable, Mann-Whitney p={p:.2g}"
    return "one run each, spread unknown: --seeds N measures it"


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
    """A value: a mean over seeds with its standard deviation; accuracy with its Wilson interval."""
    m = result.metrics
    if metric in result.spread:
        return f"{fmt(m[metric])} ± {fmt(result.spread[metric]['sd'])}"
    if metric == "accuracy_pct" and "accuracy_ci_low_pct" in m and "accuracy_ci_high_pct" in m:
        return f"{m[metric]:.1f} [{m['accuracy_ci_low_pct']:.1f}-{m['accuracy_ci_high_pct']:.1f}]"
    return fmt(m[metric])


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
                text += f" ({format_delta(r.metrics[metric], base.metrics[metric])})"
            row.append(text)
        rows.append(row)
    return rows


def render_table(results: list[CaseResult]) -> list[str]:
    """One group's table as aligned text lines."""
    rows = table_cells(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


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
    compared = (*peaks, ("weights_mib", "weight memory"), ("step_ms", "step time"),
                ("decode_tokens_per_s", "decode rate"), ("latency_ms", "latency"))
    for r in results:
        if r is base or r.status != STATUS_OK:
            continue
        phrases = [
            describe(metric, noun, r.metrics[metric], base.metrics[metric], difference_evidence(metric, r, base))
            for metric, noun in compared
            if metric in r.metrics and metric in base.metrics
        ]
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
    and the scaling efficiency against the single-device case (lorabench/distributed.py)."""
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


# the lists under a group's table: (title, what lists the items), in the order they print
_SECTIONS = (
    ("findings:", findings),
    ("memory at the tensor peak, MiB (live tensor bytes; lorabench/tensor_tracker.py):", tensor_lines),
    ("adapters (saved, reloaded, merged; lorabench/adapters.py):", adapter_lines),
    ("multi-process cases (per-device figures are the largest rank's; wall clock):", rank_lines),
    ("seconds per phase (wall clock):", phase_lines),
)


def render_summary(results: list[CaseResult], gate_counts: dict[str, int] | None = None) -> list[str]:
    lines: list[str] = []
    for (model, dataset, device), group in group_results(results).items():
        base = pick_baseline(group)
        base_text = f"baseline {base.config_id}" if base else "no baseline (no case ran)"
        dtypes = sorted({str(r.config["dtype"]) for r in group if r.config.get("dtype")})
        dtype_text = f", trained in {'/'.join(dtypes)}" if dtypes else ""
        seeds = max(n_seeds(r) for r in group)
        spread = f"; {seeds} seeds: mean ± standard deviation" if seeds > 1 else ""
        lines.append(f"{model} on {dataset} ({device}{dtype_text}), {base_text}; "
                     f"deltas are (value - baseline) / baseline{spread}")
        lines += render_table(group)
        not_ok = [r for r in group if r.status != STATUS_OK]
        for r in not_ok:
            lines.append(f"  {r.config_id}: {r.status}: {r.error or ''}".rstrip())
        for title, section in _SECTIONS:
            items = section(group)
            if items:
                lines.append(title)
                lines += [f"  - {item}" for item in items]
        lines.append("")
    if gate_counts:
        lines.append("gates: " + ", ".join(f"{n} {status}" for status, n in gate_counts.items()))
    return lines
