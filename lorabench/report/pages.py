"""Reports for people: ``reports/summary.md``, ``reports/summary.html`` and plots (PNG and SVG).

Everything shown is computed from one stored run: an overview of statuses and gates; per
model, data set and device, the table with each value's delta against the baseline, a table
that reads every case against the baseline in words, findings, each seed's figures (with
``--seeds``) and what was not measured, grouped by reason; a model x data set table; every
gate outcome with its rule and file line; each configuration's hyper-parameters; and four
plots with a panel per model and data set. Nothing is hand-written; a metric a run did not
measure shows as "-" and the reason is listed.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorabench.config import BenchConfig
from lorabench.report.failures import gate_rows, status_text
from lorabench.storage.history import StoredRun
from lorabench.metrics import METRICS
from lorabench.report.plots import AXIS_LABELS, memory_metric
from lorabench.case_kinds import DEFAULT_KIND, kind_name
from lorabench.result import STATUS_OK, CaseResult, plain_reason
from lorabench.evaluation.seeds import n_seeds
from lorabench.report.textsafe import markdown
from lorabench.report.summary import (
    cell,
    columns_for,
    describe,
    difference_evidence,
    findings,
    fmt,
    format_delta,
    group_results,
    pick_baseline,
    table_cells,
)
from lorabench.report import plots

# Deferred imports: jinja2 inside the functions that use them: what only reads a configuration or a stored
# run starts without them.

TEMPLATE_DIR = Path(__file__).parent / "templates"
NUMERIC_CELL = re.compile(r"^[-+]?[\d,.]+%?( ± [\d,.]+)?( \([-+][\d.]+%\))?$")  # right-aligned in HTML tables
# Hyper-parameters shown per configuration: BenchConfig's fields but its id and markers.
HYPER_PARAMETERS = tuple(f.name for f in dataclasses.fields(BenchConfig) if f.name not in ("id", "tags"))
# The model x data set table: (metric, column title).
CROSS_COLUMNS = (("eval_loss", "eval loss (nats)"), ("perplexity", "perplexity"), ("accuracy_pct", "accuracy (%)"),
                 ("tokens_per_s", "tokens/s"))
SEED_COLUMNS = ("eval_loss", "accuracy_pct", "train_loss_final", "tokens_per_s", "step_ms")
# Each unit once, in words (metrics.py gives every metric one of these).
UNITS = (
    ("MiB", "mebibytes, 2^20 bytes"),
    ("ms, s", "milliseconds, seconds of wall-clock time"),
    ("tokens/s, samples/s", "non-padding tokens, training examples per second over the measured steps"),
    ("nats", "a loss in natural-log units per token; lower is better, and exp(loss) is the perplexity"),
    ("perplexity", "exp(eval loss): the model is as unsure as a uniform choice among that many tokens"),
    ("ratio", "one quantity over another of the same kind (e.g. quantized bytes over bf16 bytes): a plain number"),
    ("%, pp", "percent, and percentage points (a difference of two percentages)"),
    ("count", "a number of things (parameters, examples)"),
    ("logit, cosine", "a difference of logits; a cosine similarity between embeddings (1 = same direction)"),
)


@dataclass
class Group:
    """The cases of one model, data set and device."""

    title: str
    baseline: str | None
    seeds: int
    table: list[list[str]]
    against_baseline: list[list[str]]
    findings: list[str]
    seed_table: list[list[str]] | None
    problems: list[str]  # cases that did not finish, and why
    not_measured: list[str]  # one line per reason: the metrics and the cases it concerns


def not_measured(members: list[CaseResult]) -> list[str]:
    """What was not measured, grouped by reason: "reason: metric, metric (every case | config, config)"."""
    by_reason: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in members:
        for name, why in r.absent.items():
            by_reason[plain_reason(why)][name].add(r.config_id)
    every = {r.config_id for r in members}
    lines = []
    for reason, metrics in sorted(by_reason.items()):
        cases = set().union(*metrics.values())
        who = "every case" if cases == every and len(every) > 1 else ", ".join(c for c in dict.fromkeys(
            r.config_id for r in members) if c in cases)
        lines.append(f"{reason}: {', '.join(sorted(metrics))} ({who})")
    return lines


def seed_table(members: list[CaseResult]) -> list[list[str]] | None:
    """Each seed's figures, then the mean ± standard deviation and the 95% interval, per configuration."""
    seeded = [r for r in members if r.seeds]
    if not seeded:
        return None
    columns = [m for m in SEED_COLUMNS if any(m in r.metrics for r in seeded)]
    table = [["config", "seed"] + [f"{m} ({METRICS[m].unit})" for m in columns]]
    for r in seeded:
        for s in r.seeds:
            table.append([r.config_id, str(s["seed"])] + [fmt(s["metrics"][m]) if m in s["metrics"] else "-"
                                                          for m in columns])
        table.append([r.config_id, "mean ± sd"] + [
            f"{fmt(r.metrics[m])} ± {fmt(r.spread[m]['sd'])}" if m in r.spread else "-" for m in columns])
        table.append([r.config_id, "95% interval"] + [
            f"{fmt(r.spread[m]['ci_low'])}-{fmt(r.spread[m]['ci_high'])}" if m in r.spread else "-" for m in columns])
    return table


def build_groups(results: list[CaseResult]) -> list[Group]:
    groups = []
    for (model, dataset, device), members in group_results(results).items():
        base = pick_baseline(members)
        rows = [["config", "metric", f"baseline ({base.config_id})" if base else "baseline", "value", "change", "reads as"]]
        if base is not None:
            for r in members:
                if r is base or r.status != STATUS_OK:
                    continue
                for metric, _, noun in columns_for(members[0]):
                    if metric in r.metrics and metric in base.metrics:
                        a, b = base.metrics[metric], r.metrics[metric]
                        rows.append([r.config_id, metric, fmt(a), fmt(b), format_delta(b, a),
                                     describe(metric, noun, b, a, difference_evidence(metric, r, base))])
        problems = [f"{r.config_id}: {r.status}: {r.error or ''}".rstrip(": ") for r in members if r.status != STATUS_OK]
        dtypes = sorted({str(r.config["dtype"]) for r in members if r.config.get("dtype")})
        trained = f", trained in {'/'.join(dtypes)}" if dtypes else ""
        groups.append(Group(f"{model} on {dataset} ({device}{trained})", base.config_id if base else None,
                            max(n_seeds(r) for r in members), table_cells(members), rows, findings(members),
                            seed_table(members), problems, not_measured(members)))
    return groups


def model_by_dataset(results: list[CaseResult]) -> list[list[str]] | None:
    """Every fine-tuning case by model and data set: eval loss, perplexity, accuracy, tokens/s and peak memory;
    shown when a run has several models or data sets."""
    results = [r for r in results if kind_name(r) == DEFAULT_KIND]  # quantization-error records have no eval loss
    if len({r.model for r in results}) < 2 and len({r.dataset for r in results}) < 2:
        return None
    memory = memory_metric(results)
    columns = CROSS_COLUMNS + ((memory, AXIS_LABELS[memory]),)
    table = [["model", "data set", "config", "status"] + [title for _, title in columns]]
    for r in sorted(results, key=lambda r: (r.model, r.dataset)):
        table.append([r.model, r.dataset, r.config_id, status_text(r)] + [cell(r, m) if m in r.metrics else "-" for m, _ in columns])
    return table


def hyper_parameters(results: list[CaseResult]) -> list[list[str]]:
    """Each fine-tuning configuration's resolved hyper-parameters; one row per distinct set (a model's
    defaults fill what a configuration leaves open, so a configuration can differ between models)."""
    rows: dict[tuple, list[str]] = {}
    for r in results:
        if kind_name(r) != DEFAULT_KIND:
            continue
        values = []
        for key in HYPER_PARAMETERS:
            value = r.config.get(key)
            if key == "seed" and r.seeds:
                value = ",".join(str(s["seed"]) for s in r.seeds)
            values.append("-" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value))
        key = (r.config_id, *values)
        rows.setdefault(key, [r.config_id, ""] + values)
        models = rows[key][1]
        if r.model not in models.split(", "):
            rows[key][1] = f"{models}, {r.model}" if models else r.model
    return [["config", "models"] + list(HYPER_PARAMETERS)] + list(rows.values())


def by_field(table: list[list[str]]) -> list[list[str]]:
    """:func:`hyper_parameters` turned a quarter: a row per field, a column per configuration (and its models),
    so the page is as wide as the configurations are many, not the fields."""
    header, rows = table[0], table[1:]
    columns = [f"{row[0]} ({row[1]})" for row in rows]
    return [["field", *columns]] + [[field, *(row[i] for row in rows)] for i, field in enumerate(header) if i > 1]


def overview(results: list[CaseResult]) -> list[str]:
    """Lines: how many cases ended how, and the gate outcomes."""
    statuses = Counter(status_text(r) for r in results)
    gates = Counter(g["status"] for r in results for g in r.gates)
    lines = [f"{len(results)} case(s): " + ", ".join(f"{n} {s}" for s, n in statuses.most_common())]
    lines.append("gates: " + (", ".join(f"{n} {s}" for s, n in gates.most_common()) if gates else "none evaluated"))
    return lines


def write_report(run: StoredRun, out: Path, progress: Callable[[str], None] = lambda line: None) -> list[Path]:
    """Write the Markdown and HTML summaries and the plots of ``run`` under ``out``.

    Args:
        progress: told each stage as it starts, with the seconds spent so far (a large run takes minutes).

    Returns:
        The files written.
    """

    started = time.perf_counter()
    results = list(run.results.values())
    progress(f"report of {run.label}: {len(results)} case(s); plots ...")
    out.mkdir(parents=True, exist_ok=True)
    written = plots.write_plots(results, out / "plots")
    progress(f"report: plots written after {time.perf_counter() - started:.0f} s; tables and findings ...")
    gates = gate_rows(results)
    context = {
        "run": run,
        "machine": {k: v for k, v in sorted(run.machine.items()) if v not in (None, "")},
        "overview": overview(results),
        "groups": build_groups(results),
        "model_by_dataset": model_by_dataset(results),
        "gates": gates,
        "gates_open": [gates[0]] + [row for row in gates[1:] if row[0] != "pass"],
        "gates_passed": [gates[0]] + [row for row in gates[1:] if row[0] == "pass"],
        "hyper_parameters": hyper_parameters(results),
        "hyper_parameters_by_field": by_field(hyper_parameters(results)),
        "plots": [p.relative_to(out).as_posix() for p in written if p.suffix == ".svg"],
        "inline_plots": [inline_svg(p) for p in written if p.suffix == ".svg"],
        "units": UNITS,
    }
    for template, name in (("summary.md.j2", "summary.md"), ("summary.html.j2", "summary.html")):
        progress(f"report: {name} after {time.perf_counter() - started:.0f} s ...")
        path = out / name
        path.write_text(_render(template, context))
        written.append(path)
    progress(f"report: done in {time.perf_counter() - started:.0f} s")
    return written


def inline_svg(path: Path) -> str:
    """A plot's SVG markup for the HTML page, so summary.html needs no other file (matplotlib writes its text
    XML-escaped, so a case name cannot become markup); the XML prologue a page does not take is dropped."""
    text = path.read_text()
    return text[text.index("<svg"):]


def _render(template: str, context: dict) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = markdown
    env.tests["numeric_cell"] = lambda text: NUMERIC_CELL.match(str(text)) is not None
    return env.get_template(template).render(**context)
