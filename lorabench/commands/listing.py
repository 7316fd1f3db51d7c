"""``python -m lorabench list``: the configurations a run would hold, with their fields and pytest markers.

The fields that differ between configurations are columns; those every configuration shares are
said once above the table, so it stays narrow enough for a terminal (lorabench.report.tables folds the rest).
The bench's other kinds of case (classification, inference, quantization error) follow by id.
"""

from __future__ import annotations

from lorabench.case_kinds import DEFAULT_KIND, kinds
from lorabench.config import BenchConfig
from lorabench.matrix import Matrix
from lorabench.report.tables import render_table, terminal_width, wrap

# Not a column: the id leads each row, the markers close it, and tags show through the markers.
_NOT_FIELDS = ("id", "tags")


def _text(value) -> str:
    if value is None:
        return "model default"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    return str(value)


def split_fields(configs: list[BenchConfig]) -> tuple[list[str], dict[str, str]]:
    """(the fields whose values differ between ``configs``, in field order; {field: value} of the rest)."""
    dicts = [c.to_dict() for c in configs]
    fields = [k for k in dicts[0] if k not in _NOT_FIELDS] if dicts else []
    varying = [k for k in fields if len({_text(d[k]) for d in dicts}) > 1]
    common = {k: _text(dicts[0][k]) for k in fields if k not in varying}
    return varying, common


def _natural_width(headers: list[str], rows: list[list[str]]) -> int:
    """The width of the table with no cell folded (rich puts three characters between columns)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    return sum(widths) + 3 * (len(widths) - 1)


def list_lines(matrix: Matrix, *, width: int | None = None) -> list[str]:
    """The lines ``list`` prints for ``matrix``, folded to ``width`` columns (the terminal's when ``None``)."""
    configs = list(matrix.configs)
    varying, common = split_fields(configs)
    cases = len(matrix.models) * len(matrix.datasets) * len(configs)
    lines = wrap(f"{len(configs)} configuration(s) on {', '.join(matrix.models)} x {', '.join(matrix.datasets)}: "
                 f"{cases} fine-tuning case(s). 'model default' is filled from the model when a case runs.",
                 width=width)
    lines += wrap("every configuration: " + ", ".join(f"{k}={v}" for k, v in common.items()), width=width)
    lines.append("")
    headers = ["id", *varying, "markers"]
    rows = [[c.id, *(_text(getattr(c, k)) for k in varying), " ".join(c.markers)] for c in configs]
    if _natural_width(headers, rows) > (terminal_width() if width is None else width):
        # too wide for a column per field: the fields as key=value text, which folds at its spaces
        headers = ["id", "fields", "markers"]
        rows = [[row[0], " ".join(f"{k}={v}" for k, v in zip(varying, row[1:-1])), row[-1]] for row in rows]
    lines += render_table(headers, rows, width=width)
    others = [(name, sorted(kind.case_ids())) for name, kind in kinds().items() if name != DEFAULT_KIND]
    others = [(name, ids) for name, ids in others if ids]
    if others:
        lines.append("")
        lines += wrap("other bench cases (bench/, not from the matrix):", width=width)
        for name, ids in others:
            lines += wrap(f"{name}: {', '.join(ids)}", width=width, indent="  ")
    return lines
