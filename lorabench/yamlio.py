"""The one YAML reader of the suite: matrix files, thresholds files and ``--set`` values all go through it.

Plain YAML only, read strictly:

- a key that repeats in a mapping is an error (PyYAML would keep the last one silently);
- aliases may not refer to themselves, nor add more than :data:`MAX_ALIAS_NODES` nodes to the
  document when expanded (a few hundred bytes of nested aliases can stand for billions of nodes);
  a large document without aliases is read whatever its node count (3,000 configurations are 220 KB);
- tags other than the plain ones (strings, numbers, booleans, null, lists, mappings) are
  refused before anything is constructed, so ``!!python/object`` never runs.

Errors carry the line, so each caller can name its file the way it always does.
"""

from __future__ import annotations

from typing import Any

import yaml

# Nodes that aliases add when expanded (each alias counts the nodes it stands for, nested aliases included):
# room for a shared block of defaults merged into thousands of configurations, while the 306 bytes of
# nested aliases that stand for 10^9 nodes stop at once. thresholds.yaml, the largest file shipped, uses none.
MAX_ALIAS_NODES = 100_000
# How much of a refused tag a message shows: a tag can be megabytes long
SHOWN_TAG_CHARS = 80
PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlProblem(ValueError):
    """Why a text is not acceptable YAML, and on which line (1-based; ``None`` when unknown)."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line

    def where(self, source: str) -> str:
        """``source:line`` (or ``source`` when the line is unknown), for an error message."""
        return f"{source}:{self.line}" if self.line else source


def compose(text: str) -> yaml.Node | None:
    """Parse ``text`` into a node graph (with line marks) and check it.

    Returns:
        The root node, or ``None`` for an empty document.

    Raises:
        YamlProblem: not valid YAML, a repeated key, a custom tag, or aliases that recurse or expand too far.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise YamlProblem(f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                          mark.line + 1 if mark else None) from None
    except RecursionError:
        raise YamlProblem("not valid YAML: nested too deeply") from None
    if root is not None:
        _check(root)
    return root


def construct(node: yaml.Node | None) -> Any:
    """Python values (str, int, float, bool, None, list, dict) of a node from :func:`compose`."""
    if node is None:
        return None
    return yaml.SafeLoader("").construct_document(node)


def load(text: str) -> Any:
    """:func:`compose` then :func:`construct`.

    Raises:
        YamlProblem: as :func:`compose`.
    """
    return construct(compose(text))


def node_kind(node: yaml.Node) -> str:
    """How to name a node in a message: ``a mapping``, ``a list``, or the scalar as written."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _check(root: yaml.Node) -> None:
    """Tags, repeated keys, and the nodes aliases add: every node's size with its aliases expanded (each
    shared node computed once) less the distinct nodes seen, which is exact at the root and a lower
    bound below it, so an alias bomb stops at its first large node."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YamlProblem("an alias refers to the node that contains it (a recursive structure)", _line(node))
        if node.tag not in PLAIN_TAGS and node.tag != _MERGE_TAG:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            if len(tag) > SHOWN_TAG_CHARS:
                tag = f"{tag[:SHOWN_TAG_CHARS]}... ({len(tag):,} characters)"
            raise YamlProblem(f"YAML tag {tag!r} is not allowed; use plain strings, numbers, lists and mappings",
                              _line(node))
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    if key_node.value in seen:
                        raise YamlProblem(f"key {key_node.value!r} repeats (first at line {seen[key_node.value]}); "
                                          "each key may appear once in a mapping", _line(key_node))
                    seen[key_node.value] = _line(key_node)
                total += size(key_node) + size(value_node)
        open_nodes.discard(key)
        added_by_aliases = total - (len(sizes) + 1)  # the distinct nodes seen so far, this one included
        sizes[key] = total
        if added_by_aliases > MAX_ALIAS_NODES:
            raise YamlProblem(f"aliases expand the document by more than {MAX_ALIAS_NODES:,} nodes; write the "
                              "values out instead of nesting aliases", _line(node))
        return total

    try:
        size(root)
    except RecursionError:
        raise YamlProblem("nested too deeply") from None
