"""The terminal summary: one table per model and data set, a baseline column, worded deltas.

A delta is the relative change of a value against the baseline's, signed the way the
numbers move: a memory reduction prints as ``-78.4%`` and reads "78.4% less". Whether
that is better or worse comes from the metric's direction in :mod:`lorabench.metrics`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from lorabench.matrix import BASELINE_ID
from lorabench.metrics import METRICS
from lorabench.result import STATUS_OK, CaseResult

# (metric, column title, noun for findings)
_TENSOR_PEAK = ("tensor_peak_mib", "tensor peak MiB", "peak memory (live tensor bytes)")
_PROCESS_PEAK = ("peak_rss_delta_mib", "process RSS+ MiB", "process memory (peak RSS added)")
_CUDA_PEAK = ("peak_alloc_mib", "peak alloc MiB", "peak GPU memory (allocator)")
COLUMNS = (
    ("weights_mib", "weights MiB", "weight memory"),
    ("step_ms", "step ms", "step time"),
    ("tokens_per_s", "tokens/s", "throughput"),
    ("train_loss_final", "train loss", "final train loss"),
    ("eval_loss", "eval loss", "eval loss"),
    ("perplexity", "ppl", "perplexity"),
    ("accuracy_pct", "acc % [95% CI]", "accuracy"),
    ("forgetting_nats", "forgetting", "forgetting"),
)
# Records that are not fine-tuning cases carry ``config["kind"]`` and get a table of their own.
KIND_COLUMNS = {
    "quant_error": (
        ("nf4_rel_error_mean", "NF4 err", "NF4 error"),
        ("fp4_rel_error_mean", "FP4 err", "FP4 error"),
        ("int8_rel_error_mean", "int8 err", "int8 error"),
        ("nf4_rel_error_max", "NF4 max", "largest NF4 layer error"),
        ("fp4_rel_error_max", "FP4 max", "largest FP4 layer error"),
    ),
}


def kind(result: CaseResult) -> str:
    """``finetune`` for matrix cases, else the record's own ``config["kind"]``."""
    return result.config.get("kind", "finetune")

INFERENCE_COLUMNS = (
    ("weights_mib", "weights MiB", "weight memory"),
    ("ttft_ms", "TTFT ms", "time to first token"),
    ("decode_tokens_per_s", "decode tok/s", "decode rate"),
    ("latency_ms", "latency ms", "end-to-end latency"),
    ("drift_cosine_mean", "cos to base", "similarity to the base's generations"),
    ("adapter_drift_cosine_mean", "cos to adapter", "similarity to the unmerged adapter's generations"),
)


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


def describe(metric: str, noun: str, value: float, baseline: float) -> str:
    """A phrase such as "51.6% less weight memory (3.01 vs 6.23 MiB, better)"."""
    change = relative_change(value, baseline)
    figures = f"{fmt(value)} vs {fmt(baseline)} {METRICS[metric].unit}"
    if change is None or abs(change) < 0.0005:
        return f"the same {noun} ({figures})"
    if metric in ("tokens_per_s", "samples_per_s", "decode_tokens_per_s"):
        direction = "lower" if change < 0 else "higher"
    else:
        direction = "less" if change < 0 else "more"
    return f"{abs(change) * 100:.1f}% {direction} {noun} ({figures}, {verdict(metric, value, baseline)})"


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
        suffix = "" if kind(r) == "finetune" else f" {kind(r)}"
        groups[(r.model, r.dataset, r.device + suffix)].append(r)
    return groups


def pick_baseline(results: list[CaseResult]) -> CaseResult | None:
    """``full_bf16`` where it ran, otherwise the first case that ran."""
    ok = [r for r in results if r.status == STATUS_OK]
    for r in ok:
        if r.config_id == BASELINE_ID:
            return r
    return ok[0] if ok else None


def columns_for(device: str, case_kind: str = "finetune") -> tuple[tuple[str, str, str], ...]:
    if case_kind in KIND_COLUMNS:
        return KIND_COLUMNS[case_kind]
    if case_kind == "inference":
        return (_CUDA_PEAK if device.startswith("cuda") else _PROCESS_PEAK,) + INFERENCE_COLUMNS
    # fine-tuning: exact tensor bytes lead on the CPU; on CUDA the allocator's peak, tensor bytes beside it
    peaks = (_CUDA_PEAK, _TENSOR_PEAK) if device.startswith("cuda") else (_TENSOR_PEAK, _PROCESS_PEAK)
    return peaks + COLUMNS


def _cell(result: CaseResult, metric: str) -> str:
    """A value; accuracy with its Wilson interval."""
    m = result.metrics
    if metric == "accuracy_pct" and "accuracy_ci_low_pct" in m and "accuracy_ci_high_pct" in m:
        return f"{m[metric]:.1f} [{m['accuracy_ci_low_pct']:.1f}-{m['accuracy_ci_high_pct']:.1f}]"
    return fmt(m[metric])


def table_cells(results: list[CaseResult]) -> list[list[str]]:
    """One group's table, header first; each cell shows the value and its delta against the baseline."""
    base = pick_baseline(results)
    cols = columns_for(results[0].device, kind(results[0]))
    rows = [["config", "status"] + [title for _, title, _ in cols]]
    for r in results:
        row = [r.config_id, r.status]
        for metric, _, _ in cols:
            if metric not in r.metrics:
                row.append("-")
                continue
            cell = _cell(r, metric)
            if base is not None and r is not base and metric in base.metrics:
                cell += f" ({format_delta(r.metrics[metric], base.metrics[metric])})"
            row.append(cell)
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
    """Key findings computed from the data: each case against the baseline, and the best eval loss."""
    if results and kind(results[0]) == "quant_error":
        return [f"{r.config_id}: NF4 vs FP4: " + describe("nf4_rel_error_mean", "reconstruction error",
                                                          r.metrics["nf4_rel_error_mean"], r.metrics["fp4_rel_error_mean"])
                for r in results if "nf4_rel_error_mean" in r.metrics and "fp4_rel_error_mean" in r.metrics]
    base = pick_baseline(results)
    if base is None:
        return []
    out = []
    peaks = [(metric, noun) for metric, _, noun in columns_for(base.device, kind(base))
             if METRICS[metric].group == "memory" and metric != "weights_mib"]
    compared = (*peaks, ("weights_mib", "weight memory"), ("step_ms", "step time"),
                ("decode_tokens_per_s", "decode rate"), ("latency_ms", "latency"))
    for r in results:
        if r is base or r.status != STATUS_OK:
            continue
        phrases = [
            describe(metric, noun, r.metrics[metric], base.metrics[metric])
            for metric, noun in compared
            if metric in r.metrics and metric in base.metrics
        ]
        if phrases:
            out.append(f"{r.config_id} vs {base.config_id}: " + "; ".join(phrases))
    scored = [r for r in results if "eval_loss" in r.metrics]
    if scored:
        best = min(scored, key=lambda r: r.metrics["eval_loss"])
        out.append(f"lowest eval loss: {best.config_id} ({best.metrics['eval_loss']:.4f} nats)")
    answered = [r for r in results if "accuracy_pct" in r.metrics]
    if answered:
        best = max(answered, key=lambda r: r.metrics["accuracy_pct"])
        m = best.metrics
        gain = f", {m['accuracy_gain_pp']:+.1f} pp over the base model" if "accuracy_gain_pp" in m else ""
        out.append(f"highest accuracy: {best.config_id} ({m['accuracy_pct']:.1f}%, 95% CI "
                   f"{m['accuracy_ci_low_pct']:.1f}-{m['accuracy_ci_high_pct']:.1f}%, n={m['accuracy_n']:.0f}{gain})")
    forgot = [r for r in results if "forgetting_nats" in r.metrics]
    if forgot:
        least = min(forgot, key=lambda r: r.metrics["forgetting_nats"])
        out.append(f"least forgetting: {least.config_id} (reference loss {least.metrics['reference_loss_before']:.4f} "
                   f"-> {least.metrics['reference_loss']:.4f} nats)")
    return out


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


def render_summary(results: list[CaseResult], gate_counts: dict[str, int] | None = None) -> list[str]:
    lines: list[str] = []
    for (model, dataset, device), group in group_results(results).items():
        base = pick_baseline(group)
        base_text = f"baseline {base.config_id}" if base else "no baseline (no case ran)"
        lines.append(f"{model} on {dataset} ({device}), {base_text}; deltas are (value - baseline) / baseline")
        lines += render_table(group)
        not_ok = [r for r in group if r.status != STATUS_OK]
        for r in not_ok:
            lines.append(f"  {r.config_id}: {r.status}: {r.error or ''}".rstrip())
        found = findings(group)
        if found:
            lines.append("findings:")
            lines += [f"  - {f}" for f in found]
        tensors = tensor_lines(group)
        if tensors:
            lines.append("memory at the tensor peak, MiB (live tensor bytes; lorabench/tensor_tracker.py):")
            lines += [f"  - {t}" for t in tensors]
        adapters = adapter_lines(group)
        if adapters:
            lines.append("adapters (saved, reloaded, merged; lorabench/adapters.py):")
            lines += [f"  - {a}" for a in adapters]
        lines.append("")
    if gate_counts:
        lines.append("gates: " + ", ".join(f"{n} {status}" for status, n in gate_counts.items()))
    return lines
