"""The README stays a user guide, and the documentation's links, commands and reference hold.

The README is at most 400 lines; every relative link in it and in ``docs/*.md`` names a file that
exists and, with ``#anchor``, a heading of that file (GitHub's slugs); the two set-up commands are
there byte for byte and ``.ci/run`` runs the README's test command; and ``docs/reference.md`` names
every metric, every pytest option of lorabench and every option of each ``python -m lorabench``
command, so a figure or an option added without its documentation fails here.

Markdown is parsed with markdown-it-py (CommonMark), so headings and links inside code blocks do
not count.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

from lorabench import case_kinds

from lorabench.commands import main as cli
from lorabench.metrics import METRICS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 400
SETUP_COMMANDS = (
    "python -m pip install -r requirements-cpu.txt && pytest bench/ -m qlora",
    "python -m pip install -r requirements-cpu.txt && pytest",
)
_MARKDOWN = MarkdownIt("commonmark").enable("table")


def _inline_tokens(path: Path):
    """Every inline token of a Markdown file (the text of headings, paragraphs, table cells)."""
    return [t for t in _MARKDOWN.parse(path.read_text()) if t.type == "inline"]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens.

    GitHub keeps letters, digits, ``_`` and ``-`` (github-slugger); a repeated slug gets ``-1``, ``-2``
    (see :func:`anchors`).
    """
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading of ``path``, repeats numbered as GitHub numbers them."""
    tokens = _MARKDOWN.parse(path.read_text())
    seen: dict[str, int] = {}
    result = set()
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children or () if child.type in ("text", "code_inline"))
        slug = github_slug(text)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(path: Path) -> list[str]:
    """The targets of the links and images of ``path`` that point into the repository."""
    targets = []
    for inline in _inline_tokens(path):
        for child in inline.children or ():
            target = child.attrs.get("href") if child.type == "link_open" else (
                child.attrs.get("src") if child.type == "image" else None)
            if target and not urlsplit(target).scheme:
                targets.append(str(target))
    return targets


def test_the_readme_is_a_guide_of_at_most_400_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; move detail into a docs/ page and link it (at most {MAX_README_LINES})")


@pytest.mark.parametrize("command", SETUP_COMMANDS)
def test_the_setup_commands_are_in_the_readme_verbatim(command):
    blocks = [t.content.strip() for t in _MARKDOWN.parse(README.read_text()) if t.type == "fence"]
    assert command in blocks, f"README.md has no code block that is exactly {command!r}"


def test_ci_runs_the_readmes_test_command():
    test_command = SETUP_COMMANDS[1].split("&&")[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run does not run {test_command!r} on a line of its own"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_exists(page):
    broken = []
    for target in relative_links(page):
        parts = urlsplit(target)
        linked = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif parts.fragment and linked.suffix == ".md" and parts.fragment not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{parts.fragment} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def test_the_slugs_follow_githubs_rules():
    assert github_slug("Gates: `thresholds.yaml`") == "gates-thresholdsyaml"
    assert github_slug("Across machines: `--shard I/N` and `lorabench merge`") == (
        "across-machines---shard-in-and-lorabench-merge")
    assert github_slug("This repository's CI: `.ci/run`") == "this-repositorys-ci-cirun"
    assert github_slug("Multi-process cases: `world_size`") == "multi-process-cases-world_size"


def _reference_text() -> str:
    return (ROOT / "docs" / "reference.md").read_text()


def test_the_reference_names_every_metric():
    case_kinds.kinds()  # every kind's own metrics join the registry when its module is imported
    text = _reference_text()
    missing = [name for name in METRICS if f"`{name}`" not in text]
    assert not missing, f"docs/reference.md does not define these metrics of lorabench/metrics.py: {missing}"


def test_the_reference_names_every_pytest_option(pytestconfig):
    # the options as this session registered them (pytest has no public accessor for a group's options)
    group = pytestconfig._parser.getgroup("lorabench")
    options = [name for option in group.options for name in option.names() if name.startswith("--")]
    assert "--model" in options and "--shard" in options
    text = _reference_text()
    missing = [name for name in options if f"`{name}" not in text]
    assert not missing, f"docs/reference.md does not describe these pytest options: {missing}"


def _command_section(text: str, command: str) -> str:
    """The part of reference.md on one command: from its ``**`command ...`**`` lead to the next command's."""
    start = text.find(f"**`{command}")
    if start < 0:
        return ""
    ends = [i for i in (text.find("\n**`", start + 1), text.find("\n## ", start + 1)) if i >= 0]
    return text[start:min(ends, default=len(text))]


def test_the_reference_names_every_command_option():
    text = _reference_text()
    subparsers = next(a for a in cli._parser()._actions if a.choices and isinstance(a.choices, dict))
    missing = []
    for command, parser in subparsers.choices.items():
        section = _command_section(text, command)
        if not section:
            missing.append(command)
        missing += [f"{command} {flag}" for action in parser._actions for flag in action.option_strings
                    if flag.startswith("--") and flag != "--help" and f"`{flag}" not in section]
    assert not missing, f"docs/reference.md does not describe these python -m lorabench commands or options: {missing}"
