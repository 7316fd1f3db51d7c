"""Plots of a run's results with matplotlib (no display needed), each as PNG and SVG.

memory vs training time, quality vs training time, quality vs LoRA rank, and the Pareto
frontier of memory vs quality. Axis labels name the counter a figure comes from.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lorabench.metrics import METRICS
from lorabench.result import STATUS_OK, CaseResult
from lorabench.textsafe import plot_label

FORMATS = ("png", "svg")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works on machines with no display
    import matplotlib.pyplot as plt

    return plt


def _label(metric: str) -> str:
    m = METRICS[metric]
    return f"{metric} ({m.unit}): {m.help}" if len(m.help) < 48 else f"{metric} ({m.unit})"


def _save(fig, base: Path) -> list[Path]:
    paths = []
    for ext in FORMATS:
        path = base.with_suffix(f".{ext}")
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        paths.append(path)
    _pyplot().close(fig)
    return paths


def _points(results: list[CaseResult], x: str, y: str) -> list[tuple[float, float, str]]:
    several_models = len({q.model for q in results}) > 1
    return [(r.metrics[x], r.metrics[y], plot_label(r.config_id + (f" {r.model}" if several_models else "")))
            for r in results if r.status == STATUS_OK and x in r.metrics and y in r.metrics]


def _scatter(results: list[CaseResult], x: str, y: str, title: str, base: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = _points(results, x, y)
    for px, py, name in points:
        ax.scatter(px, py)
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not points:
        ax.text(0.5, 0.5, f"no case measured both {x} and {y}", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel=_label(x), ylabel=_label(y), title=title)
    ax.grid(alpha=0.3)
    return _save(fig, base)


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (both lower-is-better), by increasing x."""
    front, best_y = [], float("inf")
    for px, py, name in sorted(points, key=lambda p: (p[0], p[1])):
        if py < best_y:
            front.append((px, py, name))
            best_y = py
    return front


def memory_metric(results: list[CaseResult]) -> str:
    """Peak memory from the CUDA allocator where cases ran on a GPU, else the process RSS the case added."""
    return "peak_alloc_mib" if any(r.device.startswith("cuda") for r in results) else "peak_rss_delta_mib"


def write_plots(results: list[CaseResult], out: Path) -> list[Path]:
    """Write the four plots under ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    memory = memory_metric(results)
    written = _scatter(results, "train_s", memory, "Memory vs training time", out / "memory_vs_time")
    written += _scatter(results, "train_s", "eval_loss", "Quality vs training time (lower eval loss is better)",
                        out / "quality_vs_time")
    written += _rank_plot(results, out / "quality_vs_rank")
    written += _pareto_plot(results, memory, out / "pareto_memory_quality")
    return written


def _rank_plot(results: list[CaseResult], base: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = defaultdict(list)
    for r in results:
        rank = r.config.get("rank")
        if r.status == STATUS_OK and r.config.get("method") != "full" and rank and "eval_loss" in r.metrics:
            series[plot_label(f"{r.config.get('quant') or 'bf16'} {r.model}")].append((rank, r.metrics["eval_loss"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if series:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no LoRA case with an eval loss", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="LoRA rank", ylabel=_label("eval_loss"), title="Quality vs LoRA rank")
    ax.grid(alpha=0.3)
    return _save(fig, base)


def _pareto_plot(results: list[CaseResult], memory: str, base: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = _points(results, memory, "eval_loss")
    front = pareto_front(points)
    for px, py, name in points:
        on_front = (px, py, name) in front
        ax.scatter(px, py, color="tab:red" if on_front else "tab:gray")
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", label="Pareto frontier")
        ax.legend(fontsize=8)
    ax.set(xlabel=_label(memory), ylabel=_label("eval_loss"), title="Memory vs quality: the Pareto frontier (red)")
    ax.grid(alpha=0.3)
    return _save(fig, base)


def loss_curve_png(result: CaseResult, path: Path) -> Path:
    """One case's training loss per step (for the Allure attachment)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(result.loss_curve) + 1), result.loss_curve, marker=".")
    ax.set(xlabel="optimizer step", ylabel="training loss (nats)", title=plot_label(f"{result.case_id}: training loss", 80))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
