"""How a comparison is shown: terminal table, CSV, JSON, Markdown.

Changes read ``(B - A) / A``: a memory reduction is negative. The status column says
whether the move is a regression or an improvement for that metric's direction. The terminal
and Markdown lead with what gates (a case's status, every metric but wall-clock figures) and the
verdict; the rest shows with ``--all`` (Markdown: in a collapsed section). CSV and JSON hold every row.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

from lorabench.report import tables
from lorabench.gates.compare import CHANGED, CONFIG_CHANGE, IMPROVED, NEW, REGRESSED, UNCHANGED, Comparison, Row
from lorabench.metrics import METRICS
from lorabench.report.textsafe import markdown

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


def is_gated(row: Row) -> bool:
    """Whether a row can decide the verdict: a case's status, or a metric that gates (not a wall-clock figure)."""
    return row.metric not in METRICS or METRICS[row.metric].gated


_ORDER = {REGRESSED: 0, IMPROVED: 1, NEW: 2, CHANGED: 3, UNCHANGED: 4}


def gated_changes(comparison: Comparison) -> list[Row]:
    """The gated rows that moved, regressions first: what a CI reader needs."""
    rows = [r for r in comparison.rows if is_gated(r) and r.status != UNCHANGED]
    return sorted(rows, key=lambda r: _ORDER.get(r.status, 5))


def informational_moves(comparison: Comparison) -> list[Row]:
    """Rows of figures that never gate (wall clock, one-shot times) that moved past their tolerance."""
    return [r for r in comparison.rows if not is_gated(r) and r.status != UNCHANGED]


def verdict_lines(comparison: Comparison) -> list[str]:
    """``no regression``, or each regression with its values, tolerance and note (and a changed configuration)."""
    regressions = comparison.regressions
    if not regressions:
        return ["no regression"]
    lines = [f"{len(regressions)} regression(s):"]
    for r in regressions:
        text = f"{r.case_id}: {r.metric} " + (f"{_num(r.a)} -> {_num(r.b)}" if r.a is not None else "")
        text += f" ({r.change_pct:+.1f}%, tolerance ±{r.tolerance_pct:g}%)" if r.change_pct is not None else ""
        text += f" {r.note}" if r.note else ""
        if r.case_id in comparison.changed_configs:
            text += f" [{CONFIG_CHANGE}: {', '.join(comparison.changed_configs[r.case_id])}]"
        lines.append(text)
    return lines


TERMINAL_HEADER = ("case / metric", "A", "B", "change", "tol.", "status", "note")


def _terminal_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    """Each case's id on a line of its own above its metrics, so the long ids take no column of their own."""
    out: list[tuple[str, ...]] = []
    for case_id, case_rows in itertools.groupby(sorted(rows, key=lambda r: r.case_id), key=lambda r: r.case_id):
        out.append((case_id,) + ("",) * (len(TERMINAL_HEADER) - 1))
        out += [("  " + cells[1], *cells[2:]) for cells in map(_cells, case_rows)]
    return out


def terminal(comparison: Comparison, show_all: bool = False, width: int | None = None) -> list[str]:
    """The comparison for a terminal or a CI log, at most ``width`` columns a line (the terminal's when None).

    By default the gated rows that moved and the verdict; ``show_all`` adds every other row.
    """
    width = tables.terminal_width() if width is None else width
    wrap = lambda text, indent="", subsequent=None: tables.wrap(  # noqa: E731
        text, width=width, indent=indent, subsequent=subsequent)
    rows = (sorted(comparison.rows, key=lambda r: _ORDER.get(r.status, 5)) if show_all
            else gated_changes(comparison))
    # no-break spaces keep "A = <run>" on one line when the header folds (textwrap splits ASCII spaces only)
    header = f"lorabench compare: A\xa0=\xa0{comparison.run_a}, B\xa0=\xa0{comparison.run_b}; change = (B - A) / A"
    lines = [line.replace("\xa0", " ") for line in wrap(header)]
    for w in comparison.warnings:
        lines += wrap(f"WARNING: {w}", subsequent="  ")
    if rows:
        lines += tables.render_table(TERMINAL_HEADER, _terminal_rows(rows), width=width, right_align=(1, 2, 3, 4))
    counts = f"{len(comparison.rows)} metric(s) compared"
    if not show_all:
        moved, unchanged = len(informational_moves(comparison)), sum(r.status == UNCHANGED for r in comparison.rows)
        counts += (f"; not shown: {moved} informational row(s) that moved (wall clock and one-shot times, never "
                   f"gated) and {unchanged} unchanged row(s) (--all shows every row)")
    lines += wrap(counts)
    verdict = verdict_lines(comparison)
    lines += wrap(verdict[0])
    for line in verdict[1:]:
        lines += wrap(line, indent="  ", subsequent="    ")
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


def markdown_lines(comparison: Comparison, show_all: bool = False) -> list[str]:
    """A comparison short enough for a pull-request comment: the verdict, the gated changes (regressions
    first), and in a collapsed section the figures that moved without gating, one line per case
    (``show_all``: every row, one per metric)."""
    esc = markdown
    n = len(comparison.regressions)
    lines = [f"### lorabench compare: {esc(comparison.run_a)} -> {esc(comparison.run_b)}", "",
             f"**{n} regression(s)**" if n else "**No regression.**", ""]
    if comparison.warnings:
        lines += [f"> **Warning:** {esc(w)}" for w in comparison.warnings] + [""]
    changes = gated_changes(comparison)
    if changes:
        lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for r in changes:
            cells = [esc(c) for c in _cells(r)]
            if r.status == REGRESSED:
                cells[6] = f"**{cells[6]}**"
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No gated figure moved past its tolerance.")
    if show_all:
        rest = [r for r in comparison.rows if r not in changes]
        summary, header = f"every other row ({len(rest)})", ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        body = ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in rest]
    else:
        by_case: dict[str, list[str]] = {}
        for r in informational_moves(comparison):
            change = "changed" if r.change_pct is None else f"{r.change_pct:+.0f}%"
            by_case.setdefault(r.case_id, []).append(f"{r.metric} {change}")
        summary = (f"informational: {sum(map(len, by_case.values()))} wall-clock and one-shot figure(s) moved in "
                   f"{len(by_case)} case(s), never gated; change = (B - A) / A")
        header = ["| case | moved |", "|---|---|"]
        body = [f"| {esc(case)} | {esc(', '.join(moves))} |" for case, moves in by_case.items()]
    if body:
        lines += ["", "<details>", f"<summary>{esc(summary)}</summary>", "", *header, *body, "", "</details>"]
    return lines


def write_markdown(comparison: Comparison, path: Path, show_all: bool = False) -> None:
    path.write_text("\n".join(markdown_lines(comparison, show_all)) + "\n")
