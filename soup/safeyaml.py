"""YAML from files, parsed with limits: size, nesting depth and alias expansion.

``yaml.safe_load`` runs no code, but a 9-line alias bomb (nine levels of nine aliases: 9**9 strings
once expanded) passes it in milliseconds as shared lists, then hangs whatever walks the data (a JSON
dump, a cache key); 10000 nested brackets end in a ``RecursionError``; an integer of 5000 digits in a
``ValueError``. Here the node graph is composed first (depth checked on the way down), its expanded
size counted (each node once, so the count is cheap), then the data is constructed: every refusal is
one ``RecipeError`` line naming the file. Anchors and merge keys (``<<: *defaults``) within the limits
work as in any YAML.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from soup.errors import RecipeError

__all__ = ["load_yaml", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES"]

MAX_BYTES = 1_000_000  # a recipe listing thousands of ingredients is a few hundred kB
MAX_DEPTH = 100  # nested lists and mappings; a recipe needs fewer than ten
MAX_NODES = 1_000_000  # values once every alias is expanded


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that refuses deep nesting while composing and numbers Python cannot convert."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _Limit(f"{mark.line + 1}:{mark.column + 1}: nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} digits (at most {sys.get_int_max_str_digits()})",
                node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


class _Limit(Exception):
    """A limit was passed (the message says which); becomes a RecipeError naming the file."""


def load_yaml(path: str | Path) -> Any:
    """Read and parse one YAML document from ``path`` within the limits.

    Raises:
        RecipeError: the file cannot be read, or is larger, deeper or expands to more than the limits.
        yaml.YAMLError: not valid YAML (with its position, for the caller to report).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:  # read at most one byte past the limit: /dev/zero ends here too
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise RecipeError(f"{path}: too large for a recipe (more than {MAX_BYTES:,} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: cannot read the recipe (not UTF-8: {e.reason} at byte {e.start})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes = _expanded_size(node)
        if nodes > MAX_NODES:
            raise _Limit(f"aliases expand to more than {MAX_NODES:,} values (an alias bomb?)")
        return loader.construct_document(node)
    except _Limit as e:
        err = RecipeError(f"{path}:{e}" if str(e)[:1].isdigit() else f"{path}: {e}")
        err.errors = [str(e)]  # as load_recipe's YAML errors: soup validate prefixes the file name
        raise err from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded, counted without expanding:
    each distinct node's size is computed once (iteratively, children first). A node that contains
    itself (``&r [*r]``) is refused: it expands forever."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            open_.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in open_:
            mark = node.start_mark
            raise _Limit(f"{mark.line + 1}:{mark.column + 1}: a recursive alias (a value that contains itself)")
        open_.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_:
                mark = child.start_mark
                raise _Limit(f"{mark.line + 1}:{mark.column + 1}: a recursive alias (a value that contains itself)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
