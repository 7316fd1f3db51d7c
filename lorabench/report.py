"""Reports for people: ``reports/summary.md``, ``reports/summary.html`` and plots (PNG and SVG).

Everything shown is computed from one stored run: the per-group table with each value's
delta against the baseline, a table that reads every case against the baseline in words,
findings, a model x data set table, quality per data set, and four plots. Nothing is
hand-written; a metric a run did not measure shows as "-" and the reason is listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorabench.history import StoredRun
from lorabench.metrics import METRICS
from lorabench.result import STATUS_OK, CaseResult
from lorabench.textsafe import markdown
from lorabench.summary import (
    columns_for,
    describe,
    findings,
    fmt,
    format_delta,
    group_results,
    kind,
    pick_baseline,
    table_cells,
)

TEMPLATE_DIR = Path(__file__).parent / "templates"
NUMERIC_CELL = re.compile(r"^[-+]?[\d,.]+%?( \([-+][\d.]+%\))?$")  # right-aligned in HTML tables


@dataclass
class Group:
    """The cases of one model, data set and device."""

    title: str
    baseline: str | None
    table: list[list[str]]
    against_baseline: list[list[str]]
    findings: list[str]
    problems: list[str]


def build_groups(results: list[CaseResult]) -> list[Group]:
    groups = []
    for (model, dataset, device), members in group_results(results).items():
        base = pick_baseline(members)
        rows = [["config", "metric", f"baseline ({base.config_id})" if base else "baseline", "value", "change", "reads as"]]
        if base is not None:
            for r in members:
                if r is base or r.status != STATUS_OK:
                    continue
                for metric, _, noun in columns_for(device, kind(members[0])):
                    if metric in r.metrics and metric in base.metrics:
                        a, b = base.metrics[metric], r.metrics[metric]
                        rows.append([r.config_id, metric, fmt(a), fmt(b), format_delta(b, a), describe(metric, noun, b, a)])
        problems = [f"{r.config_id}: {r.status}: {r.error or ''}".rstrip(": ") for r in members if r.status != STATUS_OK]
        problems += [f"{r.config_id}: {name} not measured: {why}" for r in members for name, why in sorted(r.absent.items())]
        groups.append(Group(f"{model} on {dataset} ({device})", base.config_id if base else None, table_cells(members),
                            rows, findings(members), problems))
    return groups


def model_by_dataset(results: list[CaseResult]) -> list[list[str]] | None:
    """Best eval loss (and its configuration) per model and data set, when a run has several of either."""
    results = [r for r in results if kind(r) == "finetune"]  # quantization-error records have no eval loss
    models = sorted({r.model for r in results})
    datasets = sorted({r.dataset for r in results})
    if len(models) < 2 and len(datasets) < 2:
        return None
    table = [["model"] + datasets]
    for model in models:
        row = [model]
        for dataset in datasets:
            scored = [r for r in results if (r.model, r.dataset) == (model, dataset) and "eval_loss" in r.metrics]
            best = min(scored, key=lambda r: r.metrics["eval_loss"]) if scored else None
            row.append(f"{fmt(best.metrics['eval_loss'])} ({best.config_id})" if best else "-")
        table.append(row)
    return table


def quality_by_dataset(results: list[CaseResult]) -> list[list[str]]:
    """Each configuration's eval loss per data set, with its change against that data set's baseline."""
    datasets = sorted({r.dataset for r in results})
    configs = list(dict.fromkeys(r.config_id for r in results))
    table = [["config"] + [f"{d} eval loss" for d in datasets]]
    for config in configs:
        row = [config]
        for dataset in datasets:
            members = [r for r in results if r.dataset == dataset]
            base = pick_baseline(members)
            mine = [r for r in members if r.config_id == config and "eval_loss" in r.metrics]
            if not mine:
                row.append("-")
                continue
            value = mine[0].metrics["eval_loss"]
            cell = fmt(value)
            if base is not None and base.config_id != config and "eval_loss" in base.metrics:
                cell += f" ({format_delta(value, base.metrics['eval_loss'])})"
            row.append(cell)
        table.append(row)
    return table


def write_report(run: StoredRun, out: Path) -> list[Path]:
    """Write the Markdown and HTML summaries and the plots of ``run`` under ``out``.

    Returns:
        The files written.
    """
    from lorabench import plots

    results = list(run.results.values())
    out.mkdir(parents=True, exist_ok=True)
    written = plots.write_plots(results, out / "plots")
    context = {
        "run": run,
        "machine": {k: v for k, v in sorted(run.machine.items()) if v not in (None, "")},
        "groups": build_groups(results),
        "model_by_dataset": model_by_dataset(results),
        "quality_by_dataset": quality_by_dataset(results),
        "plots": [p.relative_to(out).as_posix() for p in written if p.suffix == ".svg"],
        "units": {name: m.unit for name, m in METRICS.items()},
    }
    for template, name in (("summary.md.j2", "summary.md"), ("summary.html.j2", "summary.html")):
        path = out / name
        path.write_text(_render(template, context))
        written.append(path)
    return written


def _render(template: str, context: dict) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = markdown
    env.tests["numeric_cell"] = lambda text: NUMERIC_CELL.match(str(text)) is not None
    return env.get_template(template).render(**context)
