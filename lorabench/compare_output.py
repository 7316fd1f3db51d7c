"""How a comparison is shown: terminal table, CSV, JSON, Markdown.

Changes read ``(B - A) / A``: a memory reduction is negative. The status column says
whether the move is a regression or an improvement for that metric's direction.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lorabench.compare import REGRESSED, UNCHANGED, Comparison, Row
from lorabench.metrics import METRICS
from lorabench.textsafe import markdown

HEADER = ("case", "metric", "A", "B", "change", "tolerance", "status", "note")


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _cells(row: Row) -> tuple[str, ...]:
    unit = METRICS[row.metric].unit if row.metric in METRICS else ""
    metric = f"{row.metric} ({unit})" if unit and unit != "count" else row.metric
    change = "-" if row.change_pct is None else f"{row.change_pct:+.1f}%"
    tolerance = "-" if row.tolerance_pct is None else f"±{row.tolerance_pct:g}%"
    return (row.case_id, metric, _num(row.a), _num(row.b), change, tolerance, row.status, row.note)


def terminal(comparison: Comparison, show_all: bool = False) -> list[str]:
    rows = [r for r in comparison.rows if show_all or r.status != UNCHANGED]
    lines = [f"lorabench compare: A = {comparison.run_a}, B = {comparison.run_b}; change = (B - A) / A"]
    lines += [f"WARNING: {w}" for w in comparison.warnings]
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    if rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(HEADER, widths)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in table[1:]]
    hidden = len(comparison.rows) - len(rows)
    regressions = comparison.regressions
    counts = f"{len(comparison.rows)} metric(s) compared, {hidden} unchanged row(s) not shown" if hidden else \
        f"{len(comparison.rows)} metric(s) compared"
    lines.append(counts)
    if regressions:
        lines.append(f"{len(regressions)} regression(s):")
        lines += [f"  {r.case_id}: {r.metric} " + (f"{_num(r.a)} -> {_num(r.b)}" if r.a is not None else "")
                  + (f" ({r.change_pct:+.1f}%, tolerance ±{r.tolerance_pct:g}%)" if r.change_pct is not None else "")
                  + (f" {r.note}" if r.note else "") for r in regressions]
    else:
        lines.append("no regression")
    return lines


def write_csv(comparison: Comparison, path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run_a", "run_b", "case", "metric", "a", "b", "change_pct", "tolerance_pct", "status", "note"])
        for r in comparison.rows:
            writer.writerow([comparison.run_a, comparison.run_b, r.case_id, r.metric, r.a, r.b, r.change_pct,
                             r.tolerance_pct, r.status, r.note])


def write_json(comparison: Comparison, path: Path) -> None:
    path.write_text(json.dumps(comparison.to_dict(), indent=2))


def write_markdown(comparison: Comparison, path: Path) -> None:
    esc = markdown
    lines = [f"# lorabench compare: {esc(comparison.run_a)} -> {esc(comparison.run_b)}", "",
             "Change is (B - A) / A; a reduction is negative.", ""]
    lines += [f"> **Warning:** {esc(w)}" for w in comparison.warnings]
    n = len(comparison.regressions)
    lines += ["", f"**{n} regression(s)**" if n else "**No regression.**", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    for r in comparison.rows:
        cells = [esc(c) for c in _cells(r)]
        if r.status == REGRESSED:
            cells[6] = f"**{cells[6]}**"
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
