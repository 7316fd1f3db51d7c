"""Tables and paragraphs for people, laid out to the width they will be read at.

On a terminal that is the terminal's width (``COLUMNS`` where set, as pytest and most tools honour);
in a file it is :data:`FILE_WIDTH`, wide enough that nothing folds. rich does the layout: cells fold
inside their column instead of a line running past the edge, and the first column (an id) never
folds. Plain text, no colour codes, so CI logs and captured output read the same.
"""

from __future__ import annotations

import io
import shutil
import textwrap
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

FILE_WIDTH = 400  # tables written to files keep every column on one line


def terminal_width(default: int = 100) -> int:
    """The width output will be read at: ``COLUMNS`` or the terminal's size, else ``default``."""
    return shutil.get_terminal_size((default, 24)).columns


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int | None = None,
    right_align: Sequence[int] = (),
    indent: int = 0,
) -> list[str]:
    """Lines of a table that fits in ``width`` columns (the terminal's when None).

    Args:
        headers: one title per column.
        rows: the cells, already formatted as text.
        width: the most columns a line may take, indent included.
        right_align: indices of columns to right-align (numbers).
        indent: spaces before every line.

    Returns:
        The table's lines, trailing spaces removed.
    """
    width = terminal_width() if width is None else width
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), expand=False)
    for i, header in enumerate(headers):
        table.add_column(
            header,
            justify="right" if i in right_align else "left",
            overflow="fold",
            no_wrap=(i == 0),
        )
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    buffer = io.StringIO()
    console = Console(file=buffer, width=max(20, width - indent), color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False, soft_wrap=False)
    console.print(table)
    pad = " " * indent
    return [pad + line.rstrip() if line.strip() else "" for line in buffer.getvalue().splitlines()
            if line.strip()]


def wrap(text: str, *, width: int | None = None, indent: str = "", subsequent: str | None = None) -> list[str]:
    """One paragraph folded at word boundaries to ``width`` columns (the terminal's when None)."""
    width = terminal_width() if width is None else width
    subsequent = " " * len(indent) if subsequent is None else subsequent
    return textwrap.wrap(text, width=max(20, width), initial_indent=indent, subsequent_indent=subsequent,
                         break_long_words=True, break_on_hyphens=False) or [indent.rstrip()]
