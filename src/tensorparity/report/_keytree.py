"""The key tree: keys grouped by dotted prefix, runs of numbered siblings with the same
sub-structure (shapes and dtypes included) folded into one ``{0..23}`` group shown once.

Any report can draw one: it passes items with a ``key``, a ``kind`` (``tensor`` or ``value``),
a ``label`` (what to show next to the key) and a ``numel``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tensorparity.report._render import human_count, printable, wrapped

if TYPE_CHECKING:
    from rich.tree import Tree

__all__ = ["KeyLike", "Node", "html_tree", "key_tree", "natural_order", "rich_tree"]

MAX_KEY_DEPTH = 64  # a key with more dots keeps the rest as one name: bounded work, no deep recursion
MAX_CHILDREN = 24
CHILDREN_SHOWN = 20


class KeyLike(Protocol):
    """What the tree needs to know about one key."""

    @property
    def key(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def numel(self) -> int: ...


class _Trie:
    __slots__ = ("children", "elements", "keys", "leaf", "sig", "tensors")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.leaf: KeyLike | None = None
        self.sig = self.tensors = self.elements = self.keys = 0


@dataclass
class Node:
    """One line of the key tree as shown: name, what it is, and what hangs below it."""

    name: str
    detail: str
    kind: str  # tensor | value | branch | more
    children: list[Node]
    group: bool = False


def key_tree(keys: Sequence[KeyLike], *, fold: bool, more_hint: str = "--all shows them",
             natural: bool = False) -> list[Node]:
    """Build the (folded) tree of ``keys``; ``fold=False`` shows every key. ``natural`` sorts the
    keys by :func:`natural_order` first (else they keep their order).

    Example:
        >>> from tensorparity.checkpoint._inspect import inspect
        >>> import torch
        >>> state = {f"layers.{i}.w": torch.zeros(2) for i in range(4)}
        >>> [n.name for n in key_tree(inspect(state).keys, fold=True)[0].children]
        ['{0..3}.w']
    """
    root = _Trie()
    for info in sorted(keys, key=lambda k: natural_order(k.key)) if natural else keys:
        node = root
        for part in info.key.split(".", MAX_KEY_DEPTH - 1):
            node = node.children.setdefault(part, _Trie())
        node.leaf = info
    _measure(root, {})
    return _children(root, fold, more_hint)


def natural_order(key: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``layers.2`` before ``layers.10`` (safetensors stores keys in string
    order, which would split a run of layers into several folds).

    Example:
        >>> sorted(["l.10.w", "l.2.w", "l.1.w"], key=natural_order)
        ['l.1.w', 'l.2.w', 'l.10.w']
    """
    return tuple((0, int(p)) if _is_index(p) else (1, p) for p in key.split(".", MAX_KEY_DEPTH - 1))


def _measure(node: _Trie, table: dict[Any, int]) -> None:
    leaf = node.leaf
    tensors = int(leaf is not None and leaf.kind == "tensor")
    elements = leaf.numel if leaf is not None else 0
    keys = int(leaf is not None)
    parts = []
    for name, child in node.children.items():
        _measure(child, table)
        tensors, elements, keys = tensors + child.tensors, elements + child.elements, keys + child.keys
        parts.append((name, child.sig))
    node.tensors, node.elements, node.keys = tensors, elements, keys
    # Equal ids <=> equal sub-structure (names, shapes, dtypes, values), compared in O(1).
    node.sig = table.setdefault((leaf.label if leaf else None, tuple(parts)), len(table))


def _children(node: _Trie, fold: bool, more_hint: str) -> list[Node]:
    items = list(node.children.items())
    out: list[tuple[Node, int]] = []
    i = 0
    while i < len(items):
        name, child = items[i]
        j = i
        if fold and _is_index(name):
            while (j + 1 < len(items) and _is_index(items[j + 1][0])
                   and int(items[j + 1][0]) == int(items[j][0]) + 1 and items[j + 1][1].sig == child.sig):
                j += 1
        label = name if j == i else f"{{{name}..{items[j][0]}}}"
        out.append((_node(label, child, fold, more_hint, count=j - i + 1), sum(c.keys for _, c in items[i:j + 1])))
        i = j + 1
    if fold and len(out) > MAX_CHILDREN:
        rest = out[CHILDREN_SHOWN:]
        more = Node(f"… {len(rest)} more", f"{sum(k for _, k in rest):,} keys; {more_hint}", "more", [])
        out = [*out[:CHILDREN_SHOWN], (more, 0)]
    return [n for n, _ in out]


def _node(name: str, node: _Trie, fold: bool, more_hint: str, *, count: int = 1) -> Node:
    while node.leaf is None and len(node.children) == 1:  # a.b.c with nothing else at a or a.b
        part, node = next(iter(node.children.items()))
        name = f"{name}.{part}"
    if node.leaf is not None:
        kind, detail = node.leaf.kind, node.leaf.label
    elif node.tensors:
        kind, detail = "branch", f"{node.tensors} tensors, {human_count(node.elements)} elements"
    else:
        kind, detail = "branch", f"{node.keys} values"
    if count > 1:
        detail = f"×{count} (each {detail})" if kind == "branch" else f"×{count} {detail}"
    name = printable(name)  # whole: the terminal wraps it between components, never cuts it
    return Node(name, detail, kind, _children(node, fold, more_hint), group=count > 1)


def _is_index(name: str) -> bool:
    return name.isascii() and name.isdigit()  # "²".isdigit() is True, int("²") is not


_KIND_STYLE = {"tensor": "cyan", "value": "green", "branch": "dim", "more": "dim italic"}


def rich_tree(title: str, nodes: list[Node]) -> Tree:
    """A rich ``Tree`` of ``nodes`` under a bold ``title``."""
    from rich.text import Text
    from rich.tree import Tree

    tree = Tree(Text(title, style="bold"), guide_style="dim")

    def grow(branch: Tree, level: list[Node]) -> None:
        for n in level:
            label = Text(n.name, style="magenta" if n.group else ("italic dim" if n.kind == "more" else ""))
            label.append(f"  {n.detail}", style=_KIND_STYLE[n.kind])
            grow(branch.add(wrapped(label)), n.children)

    grow(tree, nodes)
    return tree


def html_tree(nodes: list[Node]) -> str:
    """Nested ``<ul>`` lists of ``nodes``; every name and detail is escaped."""
    e = html.escape
    items = "".join(f"<li>{e(n.name)} <span class='d'>{e(n.detail)}</span>"
                    f"{html_tree(n.children) if n.children else ''}</li>" for n in nodes)
    return f"<ul>{items}</ul>"
