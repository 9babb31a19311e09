"""The tree a migration function edits: a checkpoint's flat entries, still lazy.

A function reads values and tensors (``tree.value``, ``tree.tensor``) and records edits
(``set``, ``move``, ``copy``, ``delete``). Nothing touches a file: moved and copied tensors keep
their lazy loaders, so an untouched tensor is read once, when the output is written, straight
from the source. Every edit is remembered with the key it wrote, which is how conflicts between
migrations are found before anything is written.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from tensorparity.checkpoint import Entry, TensorEntry, ValueEntry
from tensorparity.checkpoint.tree import flatten
from tensorparity.migrate.registry import MigrationError

__all__ = ["Edit", "Tree"]

EditKind = Literal["set", "move", "copy", "delete"]
_MISSING = object()


@dataclass(frozen=True)
class Edit:
    """One edit a function made: ``kind`` of ``key`` (``source`` for a move or copy)."""

    kind: EditKind
    key: str
    source: str | None = None


class Tree:
    """A checkpoint's flat ``{dotted key: entry}``, as a migration function sees and edits it.

    Attributes:
        version: the version the checkpoint is at before this migration.
        edits: every edit made so far, in order.

    Example:
        >>> import torch, tensorparity
        >>> tree = Tree(dict(tensorparity.open({"w": torch.ones(2), "global_step": 30, "sched": {"last_epoch": 0}})))
        >>> tree.set("sched.last_epoch", tree.value("global_step") // 10)
        >>> tree.move("w", "weight"); list(tree), tree.value("sched.last_epoch")
        (['weight', 'global_step', 'sched.last_epoch'], 3)
    """

    def __init__(self, entries: dict[str, Entry], *, version: str | None = None, migration: str = "a migration") -> None:
        self._entries = dict(entries)
        self.version = version
        self.edits: list[Edit] = []
        self._who = migration

    # Reading
    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> dict[str, Entry]:
        """The entries as they are now (a copy)."""
        return dict(self._entries)

    def keys(self, pattern: str | None = None) -> list[str]:
        """The keys, or those a glob pattern (``state_dict.*.weight``) matches.

        Example:
            >>> Tree({k: None for k in ("a.w", "a.b", "c")}).keys("a.*")
            ['a.w', 'a.b']
        """
        return [k for k in self._entries if pattern is None or fnmatch.fnmatchcase(k, pattern)]

    def under(self, prefix: str) -> list[str]:
        """The keys under a dotted prefix (``lr_schedulers.0`` gives ``lr_schedulers.0.last_epoch``, ...)."""
        return [k for k in self._entries if k == prefix or k.startswith(prefix + ".")]

    def entry(self, key: str) -> Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise self._error(f"key {key!r} is not in the checkpoint", key,
                              "check the key (tensorparity inspect lists them), or guard with `if key in tree`") from None

    def is_tensor(self, key: str) -> bool:
        return isinstance(self.entry(key), TensorEntry)

    def value(self, key: str, default: Any = _MISSING) -> Any:
        """A non-tensor value (a number, string, plain list).

        Example:
            >>> Tree({}).value("epoch", 0)
            0
        """
        if key not in self._entries and default is not _MISSING:
            return default
        entry = self.entry(key)
        if isinstance(entry, TensorEntry):
            raise self._error(f"{key!r} is a tensor, not a value", key, "read it with tree.tensor(key)")
        return entry.value

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor's data (read now)."""
        entry = self.entry(key)
        if not isinstance(entry, TensorEntry):
            raise self._error(f"{key!r} is a {type(entry.value).__name__} value, not a tensor", key,
                              "read it with tree.value(key)")
        return entry.load()

    # Editing
    def set(self, key: str, value: Any) -> None:
        """Set a key to a value or a tensor (a dict or list becomes the keys under ``key``).

        Whatever was under ``key`` is replaced; a key that existed keeps its place.
        """
        self._drop_under(key, keep=not isinstance(value, (dict, list, tuple)))
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            entry: Entry = TensorEntry(key, tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size(),
                                       f"set by {self._who}", lambda t=tensor: t)
            self._entries[key] = entry
        else:
            for k, e in flatten(value, prefix=key).items():
                self._entries[k] = e
        self.edits.append(Edit("set", key))

    def set_lazy(self, key: str, *, shape: tuple[int, ...], dtype: torch.dtype,
                 compute: Callable[[], torch.Tensor]) -> None:
        """Set a tensor computed only when it is written (a large one need not sit in memory)."""
        self._drop_under(key, keep=True)
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        who = self._who

        def load() -> torch.Tensor:
            # Runs while the output is written: a failure must still be one line naming the migration.
            try:
                return compute()
            except MigrationError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's code
                raise MigrationError(f"{who}: computing {key!r} raised {type(exc).__name__}: "
                                     f"{' '.join(str(exc).split())[:200]}", key=key,
                                     fix="fix the migration's function (nothing was written)") from exc

        self._entries[key] = TensorEntry(key, tuple(shape), dtype, nbytes, f"computed by {who}", load)
        self.edits.append(Edit("set", key))

    def move(self, old: str, new: str) -> None:
        """Rename one key, keeping its place and its lazy data."""
        self.entry(old)  # a clear error when it is missing
        if new != old and new in self._entries:
            raise self._error(f"cannot move {old!r} to {new!r}: that key exists", new,
                              "delete it first, or move to another key")
        self._entries = {(new if k == old else k): (_rekey(e, new) if k == old else e)
                         for k, e in self._entries.items()}
        self.edits.append(Edit("move", new, old))

    def move_prefix(self, old: str, new: str) -> int:
        """Move every key under ``old.`` to ``new.`` (between sections); return how many moved."""
        keys = self.under(old)
        for k in keys:
            self.move(k, new + k[len(old):])
        return len(keys)

    def copy(self, source: str, key: str) -> None:
        """Add ``key`` holding the same data as ``source`` (lazily): a tied weight, an alias."""
        entry = self.entry(source)
        if key in self._entries:
            raise self._error(f"cannot copy {source!r} to {key!r}: that key exists", key, "delete it first")
        self._entries[key] = _rekey(entry, key)
        self.edits.append(Edit("copy", key, source))

    def delete(self, pattern: str) -> int:
        """Remove a key, or every key a glob pattern matches; return how many were removed."""
        keys = [pattern] if pattern in self._entries else self.keys(pattern)
        for k in keys:
            del self._entries[k]
            self.edits.append(Edit("delete", k))
        return len(keys)

    def written(self) -> set[str]:
        """Every key an edit wrote: set, moved to or from, copied to, deleted."""
        out = {e.key for e in self.edits}
        out.update(e.source for e in self.edits if e.kind == "move" and e.source)
        return out

    # Internals
    def _drop_under(self, key: str, *, keep: bool = False) -> None:
        for k in self.under(key):
            if not (keep and k == key):  # assigning an existing dict key keeps its position
                del self._entries[k]

    def _error(self, message: str, key: str, fix: str) -> MigrationError:
        return MigrationError(f"{self._who}: {message}", key=key, fix=fix)


def _rekey(entry: Entry, key: str) -> Entry:
    return ValueEntry(key, entry.value) if isinstance(entry, ValueEntry) else replace(entry, key=key)
