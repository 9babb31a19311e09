"""Put a flat checkpoint back into the nested shape of its source.

A :class:`Checkpoint` is flat (``optimizer_states.0.state.0.exp_avg``); a torch file or a DCP
checkpoint is nested, with int keys, lists, and dicts whose keys hold dots (a state dict).
The flat key alone cannot say which dot is a level, so the reader's ``Checkpoint.structure``
(the nested object as read) is the template: :func:`rebuild` walks it exactly as
:func:`tensorparity.checkpoint.tree.flatten` does, and fills each leaf with the entry of the
same key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensorparity.checkpoint.format_registry import open_path
from tensorparity.checkpoint.safe_pickle import Placeholder
from tensorparity.checkpoint.tree import (
    MAX_DEPTH,
    Checkpoint,
    Entry,
    LazyTensor,
    TensorEntry,
    _is_plain_list,
    _key_part,
)
from tensorparity.errors import CorruptCheckpointError, TensorParityError

__all__ = ["rebuild", "structure_of"]


@dataclass(frozen=True)
class _Slot:
    """Where a flat key sits in the skeleton of the source structure."""

    key: str


class _Drop:
    """A leaf or container that is no longer there."""


_DROP = _Drop()


def _skeleton(obj: Any) -> tuple[Any, dict[str, dict[Any, Any]]]:
    """The structure with every leaf replaced by its flat key (the walk of ``flatten``), and
    every non-empty dict by its key path."""
    dicts: dict[str, dict[Any, Any]] = {}

    def walk(value: Any, key: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(f"structure nests more than {MAX_DEPTH} levels deep", key=key)
        if isinstance(value, (LazyTensor, torch.Tensor, Placeholder)) or (
                isinstance(value, np.ndarray) and value.dtype != np.object_):
            return _Slot(key)
        if isinstance(value, Mapping) and value:
            out = {k: walk(v, f"{key}.{_key_part(k)}" if key else _key_part(k), depth + 1) for k, v in value.items()}
            dicts[key] = out
            return out
        if isinstance(value, (list, tuple)) and value and not _is_plain_list(value):
            items = [walk(v, f"{key}.{i}" if key else str(i), depth + 1) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return _Slot(key)

    return walk(obj, "", 0), dicts


def _nested_style(node: dict[Any, Any]) -> bool:
    """A dict of sections (``{"model": {...}, "epoch": 3}``), not a state dict of dotted keys."""
    return (all(not (isinstance(k, str) and "." in k) for k in node)
            and any(isinstance(v, (dict, list, tuple)) for v in node.values()))


def _deepest(key: str, by_path: dict[str, Any]) -> str:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in by_path:
            return prefix
    return ""


def structure_of(ckpt: Checkpoint) -> Any:
    """The nested structure to write ``ckpt`` in: its own, or its source file's, or ``None`` (flat).

    A checkpoint built by hand (a migration's result) may carry no structure; when its source is
    a file that tensorparity reads as a nested object, that file's structure is the template.

    Example:
        >>> import torch
        >>> from tensorparity import open as tp_open
        >>> structure_of(tp_open({"model": {"w": torch.ones(1)}})).keys()
        dict_keys(['model'])
    """
    if ckpt.structure is not None:
        return ckpt.structure
    path = Path(ckpt.source)
    try:
        readable = path.exists()
    except (OSError, ValueError):
        return None
    if not readable:
        return None
    try:
        with open_path(path) as again:
            return again.structure
    except TensorParityError:
        return None


def rebuild(ckpt: Checkpoint, structure: Any, stub: Callable[[TensorEntry], Any]) -> Any:
    """The nested object to write: the source's containers, filled with ``ckpt``'s entries.

    A key of the structure that ``ckpt`` no longer has is left out (a list closes up; a
    container left empty goes too). A key the structure did not have (renamed by a mapping,
    added by a migration) goes into the deepest dict whose path prefixes it: into a Lightning
    ``state_dict`` as one dotted key (``layer.weight``), into a dict of sections as nested dicts.
    Without a structure the result is a flat dict. ``stub(entry)`` is what a tensor becomes.

    Example:
        >>> import torch
        >>> from tensorparity import open as tp_open
        >>> src = tp_open({"state_dict": {"a.w": torch.ones(1)}, "epoch": 2})
        >>> moved = tp_open({"state_dict.b.w": torch.ones(1), "epoch": 2, "loops.fit.step": 5})
        >>> rebuild(moved, src.structure, lambda e: e.key)
        {'state_dict': {'b.w': 'state_dict.b.w'}, 'epoch': 2, 'loops': {'fit': {'step': 5}}}
    """
    used: set[str] = set()
    emptied: set[int] = set()  # containers that had children and lost them all
    filled: dict[int, Any] = {}  # id(skeleton dict) -> the dict being filled

    def value_of(entry: Entry) -> Any:
        return stub(entry) if isinstance(entry, TensorEntry) else entry.value

    def fill(node: Any) -> Any:
        if isinstance(node, _Slot):
            entry = ckpt.get(node.key)
            if entry is None:
                return _DROP
            used.add(node.key)
            return value_of(entry)
        if isinstance(node, dict):
            out = {k: f for k, v in node.items() if (f := fill(v)) is not _DROP}
            filled[id(node)] = out
        else:
            items = [f for v in node if (f := fill(v)) is not _DROP]
            out = items if isinstance(node, list) else tuple(items)  # type: ignore[assignment]
        if node and not out:
            emptied.add(id(out))
        return out

    skeleton, dicts = _skeleton(structure) if structure is not None else ({}, {})
    root = fill(skeleton)
    rest = [k for k in ckpt if k not in used]
    if rest and not isinstance(root, dict):
        # A bare tensor or list at the top cannot take new keys: the whole becomes a flat dict.
        return {k: value_of(e) for k, e in ckpt.items()}
    if isinstance(root, _Drop):
        root = {}
    targets = {path: (filled[id(d)], _nested_style(d)) for path, d in dicts.items()}
    targets.setdefault("", (root, isinstance(skeleton, dict) and _nested_style(skeleton)))
    for key in rest:
        prefix = _deepest(key, targets)
        container, nested = targets[prefix]
        tail = key[len(prefix) + 1:] if prefix else key
        parts = tail.split(".") if nested else [tail]
        while len(parts) > 1:
            child = container.setdefault(parts[0], {})
            if not isinstance(child, dict):  # a leaf already there: keep the dotted remainder whole
                break
            container, parts = child, parts[1:]
        container[".".join(parts)] = value_of(ckpt[key])
    pruned = _prune(root, emptied)
    return {} if isinstance(pruned, _Drop) else pruned


def _prune(value: Any, emptied: set[int]) -> Any:
    """Drop the containers that lost every child (and received no new key), bottom-up.

    An empty container that was empty in the source (a value entry ``{}``) stays.
    """
    if not isinstance(value, (dict, list, tuple)):
        return value
    had_children = bool(value) or id(value) in emptied
    if isinstance(value, dict):
        for k in list(value):
            kept = _prune(value[k], emptied)
            if isinstance(kept, _Drop):
                del value[k]
            else:
                value[k] = kept
        out: Any = value
    else:
        items = [kept for v in value if not isinstance(kept := _prune(v, emptied), _Drop)]
        out = items if isinstance(value, list) else tuple(items)
    return _DROP if had_children and not out else out
