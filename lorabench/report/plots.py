"""Plots of a run's results with matplotlib (no display needed), each as PNG and SVG.

memory vs training time, quality vs training time, quality vs LoRA rank, the Pareto frontier
of memory vs quality, and every configuration's training loss overlaid. Each plot has one panel
per model and data set, titled with both, so cases of different tasks are never drawn on one
axis. Memory is the device's primary figure: the CUDA allocator's peak on a GPU, the peak of
live tensor bytes on the CPU (the process RSS, mostly library overhead, cannot rank
configurations). Axes are labelled in words with the counter and unit; a case run at several
seeds (``--seeds``) shows its mean with a bar of one standard deviation. The frontier is drawn
solid only where the 95% intervals of its points' losses separate, else dashed and said so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from lorabench import backends
from lorabench.case_kinds import DEFAULT_KIND, kind_name
from lorabench.metrics import METRICS
from lorabench.result import STATUS_OK, CaseResult
from lorabench.evaluation.seeds import separated
from lorabench.report.textsafe import plot_label
from lorabench.matrix import short_name

# Deferred imports: matplotlib inside the functions that use them: what only reads a configuration or a
# stored run starts without them.

FORMATS = ("png", "svg")
PANEL_SIZE = (6.4, 4.2)  # inches per model x data set panel
# Past this many cases in a panel, points and curves go unnamed and drawn as one artist each: names would
# cover the plot, and laying out thousands of labels and legend entries takes minutes (a 10,000-case run).
NAMED_CASES_MAX = 40
# Axis labels in words for the figures the plots draw (any other metric: its name and unit).
AXIS_LABELS = {
    "train_s": "training time (s, wall clock of all steps)",
    "eval_loss": "held-out loss after training (nats)",
    "tensor_peak_mib": "peak memory (MiB of live tensors in a step)",
    "peak_alloc_mib": "peak GPU memory (MiB, CUDA allocator)",
    "peak_rss_delta_mib": "process memory added (MiB, peak RSS)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works on machines with no display
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text: searchable, and smaller
    import matplotlib.pyplot as plt

    return plt


def _label(metric: str) -> str:
    """The axis label: in words where the plots know the figure, else its name (lorabench/metrics.py) and unit."""
    return AXIS_LABELS.get(metric) or f"{metric} ({METRICS[metric].unit})"


def _save(fig, base: Path) -> list[Path]:
    paths = []
    for ext in FORMATS:
        path = base.with_suffix(f".{ext}")
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        paths.append(path)
    _pyplot().close(fig)
    return paths


def panels(results: list[CaseResult]) -> list[tuple[str, str, list[CaseResult]]]:
    """(model, data set, its fine-tuning cases that ran), in run order: one panel each."""
    grouped: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    for r in results:
        if kind_name(r) == DEFAULT_KIND and r.status == STATUS_OK:
            grouped[(r.model, r.dataset)].append(r)
    return [(model, dataset, members) for (model, dataset), members in grouped.items()]


def _figure(n: int, title: str):
    """A figure with ``n`` panels in a near-square grid, at most three a row."""

    plt = _pyplot()
    cols = min(math.ceil(math.sqrt(max(n, 1))), 3)
    rows = -(-max(n, 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + 0.4), squeeze=False,
                             layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, flat[:max(n, 1)]


def _sd(result: CaseResult, metric: str) -> float | None:
    spread = result.spread.get(metric)
    return spread["sd"] if spread else None


def _points(members: list[CaseResult], x: str, y: str) -> list[tuple[float, float, str, CaseResult]]:
    return [(r.metrics[x], r.metrics[y], r.config_id, r) for r in members if x in r.metrics and y in r.metrics]


def _draw_points(ax, points, x: str, y: str, colour=None) -> None:
    """Each case at its (mean) values, a bar of one standard deviation where it ran several seeds, named
    (up to :data:`NAMED_CASES_MAX` cases; past that, unnamed, one artist per colour)."""
    if len(points) > NAMED_CASES_MAX:
        by_colour: dict = defaultdict(list)
        for point in points:
            by_colour[colour(point[3]) if colour else None].append(point)
        for c, group in sorted(by_colour.items(), key=lambda item: -len(item[1])):  # the fewest (a frontier) on top
            ax.errorbar([p[0] for p in group], [p[1] for p in group], xerr=_bars([_sd(p[3], x) for p in group]),
                        yerr=_bars([_sd(p[3], y) for p in group]), fmt="o", markersize=3, color=c, capsize=0)
        _unnamed_note(ax, len(points))
        return
    for px, py, name, r in points:
        ax.errorbar(px, py, xerr=_sd(r, x), yerr=_sd(r, y), fmt="o", color=colour(r) if colour else None, capsize=3)
        ax.annotate(plot_label(name), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)


def _bars(sds: list[float | None]) -> list[float] | None:
    """Error bars of unnamed points: ``None`` when no point has any (each bar, even of length 0, is a path
    of its own in the SVG: tens of seconds for 10,000 points)."""
    return [sd or 0.0 for sd in sds] if any(sds) else None


def _unnamed_note(ax, cases: int) -> None:
    ax.text(0.01, 0.01, f"{cases} cases: not named (more than {NAMED_CASES_MAX}); summary.md lists them",
            transform=ax.transAxes, fontsize=7, color="dimgray")


def _panel_axes(ax, model: str, dataset: str, x: str, y: str) -> None:
    ax.set_title(plot_label(f"{short_name(model)} on {short_name(dataset)}"), fontsize=10)
    ax.set(xlabel=_label(x), ylabel=_label(y))
    ax.margins(x=0.18, y=0.12)  # room for the case names written beside the points
    ax.grid(alpha=0.3)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _scatter(results: list[CaseResult], x: str, y: str, title: str, base: Path) -> list[Path]:
    found = panels(results)
    fig, axes = _figure(len(found), title)
    for ax, (model, dataset, members) in zip(axes, found):
        _panel_axes(ax, model, dataset, x, y)
        points = _points(members, x, y)
        _draw_points(ax, points, x, y)
        if not points:
            _empty(ax, f"no case measured both {x} and {y}")
    if not found:
        _empty(axes[0], "no fine-tuning case ran")
    return _save(fig, base)


def pareto_front(points: list[tuple]) -> list[tuple]:
    """The points no other point beats on both axes (both lower-is-better), by increasing x.

    Each point is ``(x, y, ...)``; whatever follows x and y is carried along.
    """
    front, best_y = [], float("inf")
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if point[1] < best_y:
            front.append(point)
            best_y = point[1]
    return front


def memory_metric(results: list[CaseResult]) -> str:
    """The device's primary memory figure: the CUDA allocator's peak where cases ran on a GPU, else the peak of
    live tensor bytes; the process RSS added only for records that lack tensor bytes (older stored runs)."""
    if any(r.device.startswith("cuda") for r in results):
        return "peak_alloc_mib"
    return "tensor_peak_mib" if any("tensor_peak_mib" in r.metrics for r in results) else "peak_rss_delta_mib"


def write_plots(results: list[CaseResult], out: Path) -> list[Path]:
    """Write the four plots under ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    memory = memory_metric(results)
    written = _scatter(results, "train_s", memory, "Memory vs training time", out / "memory_vs_time")
    written += _scatter(results, "train_s", "eval_loss", "Quality vs training time (lower eval loss is better)",
                        out / "quality_vs_time")
    written += _rank_plot(results, out / "quality_vs_rank")
    written += _pareto_plot(results, memory, out / "pareto_memory_quality")
    written += _loss_curves_plot(results, out / "loss_curves")
    return written


def base_label(config: dict) -> str:
    """How a LoRA case's base is stored: ``NF4 base (double quant.)``, ``int8 base``, ``bf16 base``."""
    quant = config.get("quant") or "none"
    if quant == "none":
        return f"{config.get('dtype', 'bf16')} base"
    name = backends.format_for(quant).label if quant in backends.quant_values() else quant
    return f"{name} base" + (" (double quant.)" if config.get("double_quant") else "")


def _series_name(r: CaseResult) -> str:
    """A rank series: cases that differ only in rank (a sweep) share one; others stand alone under their id."""
    c = r.config
    if "sweep" in (c.get("tags") or ()):
        return f"{base_label(c)}, alpha {c.get('alpha')} (sweep)"
    return f"{r.config_id}: {base_label(c)}, alpha {c.get('alpha')}"


def _rank_plot(results: list[CaseResult], base: Path) -> list[Path]:
    from matplotlib.ticker import NullLocator

    found = panels(results)
    fig, axes = _figure(len(found), "Quality vs LoRA rank")
    for ax, (model, dataset, members) in zip(axes, found):
        _panel_axes(ax, model, dataset, "eval_loss", "eval_loss")
        ax.set_xlabel("LoRA rank (log scale)")
        series: dict[str, list[tuple[int, float, float | None, str]]] = defaultdict(list)
        for r in members:
            rank = r.config.get("rank")
            if r.config.get("method") != "full" and rank and "eval_loss" in r.metrics:
                series[plot_label(_series_name(r))].append((int(rank), r.metrics["eval_loss"], _sd(r, "eval_loss"), r.config_id))
        ranks = sorted({p[0] for pts in series.values() for p in pts})
        pts = [p for points in series.values() for p in points]
        if len(pts) > NAMED_CASES_MAX:  # one artist, no names, no legend
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=_bars([p[2] for p in pts]), fmt="o",
                        markersize=3, capsize=0)
            _unnamed_note(ax, len(pts))
            series_named = {}
        else:
            series_named = series
        for name, pts in sorted(series_named.items()):
            pts.sort(key=lambda p: p[0])
            yerr = [p[2] or 0.0 for p in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr if any(yerr) else None, marker="o",
                        capsize=3, label=name, linestyle="-" if len(pts) > 1 else "none")
            for rank, loss, _, config_id in pts:
                ax.annotate(plot_label(config_id), (rank, loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if series:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(ranks, [str(r) for r in ranks])  # the ranks used, written as numbers
            if series_named:
                ax.legend(fontsize=7)
        else:
            _empty(ax, "no LoRA case with an eval loss")
    if not found:
        _empty(axes[0], "no fine-tuning case ran")
    return _save(fig, base)


def front_is_decided(front: list[tuple], points: list[tuple], metric: str = "eval_loss") -> bool:
    """Whether the frontier is a finding: every point of the panel has a 95% interval of ``metric`` (it ran at
    several seeds), each neighbouring pair along the frontier separates (:func:`lorabench.evaluation.seeds.separated`),
    and each point off it is beaten by a frontier point of no more memory whose interval lies apart from its own."""
    if not all(p[3].spread.get(metric) for p in points):
        return False
    if not all(separated(a[3], b[3], metric) for a, b in zip(front, front[1:])):
        return False
    on_front = {id(q[3]) for q in front}
    return all(any(q[0] <= p[0] and q[1] < p[1] and separated(q[3], p[3], metric) for q in front)
               for p in points if id(p[3]) not in on_front)


def _pareto_plot(results: list[CaseResult], memory: str, base: Path) -> list[Path]:
    found = panels(results)
    fig, axes = _figure(len(found), "Memory vs quality: the Pareto frontier (red; dashed where the losses' "
                                    "intervals do not separate)")
    for ax, (model, dataset, members) in zip(axes, found):
        _panel_axes(ax, model, dataset, memory, "eval_loss")
        points = _points(members, memory, "eval_loss")
        front = pareto_front(points)
        on_front = {id(p[3]) for p in front}
        _draw_points(ax, points, memory, "eval_loss",
                     colour=lambda r: "tab:red" if id(r) in on_front else "tab:gray")
        if front:
            decided = front_is_decided(front, points)
            label = ("Pareto frontier: its losses' 95% intervals separate" if decided else
                     "Pareto frontier of the mean losses: not shown to differ\n(one seed, or overlapping 95% "
                     "intervals; run --seeds 3)")
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red",
                    linestyle="-" if decided else "--", label=label)
            ax.legend(fontsize=7)
        if not points:
            _empty(ax, f"no case measured both {memory} and eval_loss")
    if not found:
        _empty(axes[0], "no fine-tuning case ran")
    return _save(fig, base)


def _loss_curves_plot(results: list[CaseResult], base: Path) -> list[Path]:
    """Every configuration's training loss per step, overlaid in one panel per model and data set; a case run
    at several seeds draws each seed's curve in its colour."""
    plt = _pyplot()
    found = panels(results)
    fig, axes = _figure(len(found), "Training loss per step, every configuration")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (model, dataset, members) in zip(axes, found):
        _panel_axes(ax, model, dataset, "eval_loss", "eval_loss")
        ax.set(xlabel="optimizer step", ylabel="training loss (nats)")
        ax.margins(x=0.02)  # no case names beside the lines to make room for
        drawn = 0
        if len(members) > NAMED_CASES_MAX:  # one artist, no names, no legend
            from matplotlib.collections import LineCollection

            curves = [c for r in members for c in ([s["loss_curve"] for s in r.seeds if s.get("loss_curve")]
                                                   or [r.loss_curve]) if c]
            ax.add_collection(LineCollection([list(enumerate(c, 1)) for c in curves], linewidths=0.6, alpha=0.4))
            ax.autoscale_view()
            _unnamed_note(ax, len(members))
            drawn = len(curves)
            members = []  # drawn
        for i, r in enumerate(members):
            curves = [s["loss_curve"] for s in r.seeds if s.get("loss_curve")] or [r.loss_curve]
            for j, curve in enumerate(c for c in curves if c):
                ax.plot(range(1, len(curve) + 1), curve, color=colours[i % len(colours)], linewidth=1.2,
                        alpha=0.9 if len(curves) == 1 else 0.6, label=plot_label(r.config_id) if j == 0 else None)
                drawn += 1
        if drawn and members:
            ax.legend(fontsize=7, ncol=2)
        elif not drawn:
            _empty(ax, "no case recorded a loss curve")
    if not found:
        _empty(axes[0], "no fine-tuning case ran")
    return _save(fig, base)


def loss_curve_png(result: CaseResult, path: Path) -> Path:
    """One case's training loss per step, one line per seed (for the Allure attachment)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    curves = [(f"seed {s['seed']}", s["loss_curve"]) for s in result.seeds if s.get("loss_curve")] or \
        [(None, result.loss_curve)]
    for label, curve in curves:
        ax.plot(range(1, len(curve) + 1), curve, marker=".", label=label)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats)",
           title=plot_label(f"{result.case_id}: training loss ({result.model} on {result.dataset})", 80))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
