"""Any string a run carries (model paths, data set names, configuration ids, errors) made safe for
where it is shown: Markdown tables and lists, and matplotlib labels.

Markdown: one line (a newline would end a table row), HTML-escaped (Markdown passes raw HTML
through), and its punctuation backslash-escaped so that ``|`` splits no cell, `` ` `` opens no code
span, ``$`` starts no math (GitHub renders ``$...$``) and ``*`` or ``[`` start nothing.

matplotlib: ``$`` starts mathtext, whose parser raises on text that is not TeX, so each one is
escaped; control characters are dropped and long names shortened so a label cannot push a plot
to thousands of pixels.
"""

from __future__ import annotations

import html
import re

# Markdown punctuation that can start or end markup anywhere in a line.
_MD_PUNCTUATION = re.compile(r"([\\`*\[\]{}|~$!])")
# "_" marks emphasis only at a word's edge; inside snake_case names it is plain text.
_MD_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PLOT_LABEL_CHARS = 48


def markdown(text: object) -> str:
    """``text`` as literal Markdown inline text (a table cell, a list item, a heading)."""
    one_line = " ".join(_CONTROL.sub(" ", str(text)).split())
    escaped = _MD_PUNCTUATION.sub(r"\\\1", html.escape(one_line, quote=False))
    return _MD_EDGE_UNDERSCORE.sub(r"\\_", escaped)


def plot_label(text: object, limit: int = PLOT_LABEL_CHARS) -> str:
    """``text`` as a matplotlib label shown literally: ``$`` escaped, one line, at most ``limit`` characters."""
    one_line = " ".join(_CONTROL.sub(" ", str(text)).split())
    if len(one_line) > limit:
        one_line = one_line[: limit - 1] + "…"
    return one_line.replace("$", r"\$")
