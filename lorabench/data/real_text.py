"""Held-out English prose for a real model's perplexity and forgetting, from the Python standard library.

Source: ``pydoc_data.topics``, the text of the Python Language Reference and Library Reference
topics that ``help()`` shows, which ships with CPython (written by people, not generated). A
pretrained web-text model has most likely read these pages in some form, which is what a
forgetting reference should be: text the model already predicts well, which fine-tuning on
another task must not spoil. Only prose paragraphs are kept: no indented code, no ``>>>``
sessions, no paragraph that introduces a code block, at least 300 characters and almost all
letters and spaces. Every k-th such paragraph is taken, in topic order, so the rows spread over
the whole reference. The text changes a little between Python versions; :data:`SOURCE` names the
version, and a comparison of figures across runs holds only at the same one.
"""

from __future__ import annotations

import re
import sys

import pydoc_data.topics

PROSE_ROWS = 32  # x seq_len tokens per reference pass: 2048 tokens at the real model's length 64
MIN_CHARS = 300
MIN_LETTER_SHARE = 0.9
SOURCE = f"pydoc_data.topics of Python {sys.version_info.major}.{sys.version_info.minor} (the Python reference's help topics)"

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def is_prose(paragraph: str) -> bool:
    """A paragraph of running text: not code, not a console session, not a lead-in to a code block."""
    if paragraph.startswith((" ", "\t")) or ">>>" in paragraph or paragraph.rstrip().endswith("::"):
        return False
    text = " ".join(paragraph.split())
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return len(text) >= MIN_CHARS and letters >= MIN_LETTER_SHARE * len(text)


def prose_paragraphs() -> list[str]:
    """Every prose paragraph of the help topics once (several topics repeat a section), whitespace
    folded, topics in sorted order."""
    return list(dict.fromkeys(" ".join(p.split())
                              for key in sorted(pydoc_data.topics.topics)
                              for p in _PARAGRAPH_BREAK.split(pydoc_data.topics.topics[key])
                              if is_prose(p)))


def prose_rows(count: int = PROSE_ROWS) -> list[dict[str, str]]:
    """``count`` plain ``text`` rows spread evenly over :func:`prose_paragraphs`.

    Raises:
        ValueError: the standard library holds fewer prose paragraphs than ``count``.
    """
    paragraphs = prose_paragraphs()
    if len(paragraphs) < count:
        raise ValueError(f"{SOURCE}: {len(paragraphs)} prose paragraphs, fewer than the {count} needed")
    stride = len(paragraphs) / count
    return [{"text": paragraphs[int(i * stride)]} for i in range(count)]
