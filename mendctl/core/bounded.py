"""Reading the user's JSON and YAML within bounds: a few kilobytes must never hang or crash a command.

Two shapes of input do: nesting thousands of levels deep (the parsers and every walk over the result
recurse, and Python stops them with a RecursionError), and YAML aliases that refer to aliases, which
expand to a tree exponentially larger than the text (1.5 KB of them is billions of nodes). Both are
refused here, in time linear in the text, with a ValueError naming the source.
"""
from __future__ import annotations

import json
import re
from typing import Any

import yaml

MAX_DEPTH = 64  # a recipe nests 4 levels, a task file 2: anything deeper is not ours
MAX_YAML_NODES = 100_000  # nodes of a YAML document with every alias expanded; a recipe has a few hundred

_JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")
_YAML_QUOTED = re.compile(r'"(?:\\.|[^"\\])*"|\'[^\']*\'|#[^\n]*')


class TooDeep(ValueError):
    pass


def json_depth(text: str, strings: re.Pattern = _JSON_STRING) -> int:
    """The deepest nesting of [ and { in a JSON text (or YAML's flow style, with its `strings`), without
    parsing it: the parsers recurse, and take seconds to reach Python's recursion limit."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the common case: too few brackets to matter
        return 0
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(strings.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_json(text: str, where: str) -> Any:
    """json.loads, refusing nesting deeper than MAX_DEPTH with a TooDeep naming `where`."""
    if (depth := json_depth(text)) > MAX_DEPTH:
        raise TooDeep(f"{where}: nested {depth} levels deep; at most {MAX_DEPTH} are read")
    try:
        return json.loads(text)
    except RecursionError:
        raise TooDeep(f"{where}: nested too deeply; at most {MAX_DEPTH} levels are read") from None


def check_yaml_tree(root: yaml.Node | None, where: str) -> None:
    """Refuses a composed YAML document nested deeper than MAX_DEPTH, whose aliases expand to more than
    MAX_YAML_NODES nodes, or which holds itself. Each distinct node is visited once."""
    if root is None:
        return
    size: dict[int, int] = {}  # nodes of the subtree, aliases expanded
    height: dict[int, int] = {}  # levels of the subtree, aliases expanded
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]  # (node, its children done): no recursion
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if not done:
            if id(node) in size:
                continue
            if id(node) in open_:
                raise TooDeep(f"{where}:{node.start_mark.line + 1}: an alias refers to a node that holds it")
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
            continue
        open_.discard(id(node))
        size[id(node)] = 1 + sum(size[id(c)] for c in children)
        height[id(node)] = 1 + max((height[id(c)] for c in children), default=0)
        line = node.start_mark.line + 1
        if height[id(node)] > MAX_DEPTH:
            raise TooDeep(f"{where}:{line}: nested more than {MAX_DEPTH} levels deep")
        if size[id(node)] > MAX_YAML_NODES:
            raise TooDeep(f"{where}:{line}: its aliases expand to more than {MAX_YAML_NODES} values; a recipe is "
                          "far smaller (write the values out, or nest fewer aliases)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def compose_yaml(text: str, where: str) -> yaml.Node | None:
    """yaml.compose within the bounds above (composing keeps aliases as shared nodes: no expansion)."""
    if (depth := json_depth(text, _YAML_QUOTED)) > MAX_DEPTH:
        raise TooDeep(f"{where}: nested {depth} levels deep; at most {MAX_DEPTH} are read")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise TooDeep(f"{where}: nested too deeply; at most {MAX_DEPTH} levels are read") from None
    check_yaml_tree(root, where)
    return root


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load within the bounds above: the document is composed and checked first."""
    compose_yaml(text, where)
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise TooDeep(f"{where}: nested too deeply; at most {MAX_DEPTH} levels are read") from None
