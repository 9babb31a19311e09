"""The spine: a checkpoint is a lazy, flat mapping from dotted key to entry.

Whatever a checkpoint came from (a file in any format, a live ``nn.Module``, a trace directory),
it opens as a :class:`Checkpoint`. Tensor entries know shape, dtype, byte size and where their bytes
are, and read them only when :meth:`TensorEntry.load` is called; value entries hold plain data.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from tensorparity._dtypes import dtype_name, to_torch
from tensorparity.checkpoint._plain import placeholder_children
from tensorparity.checkpoint.safe_pickle import Placeholder
from tensorparity.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["ByteSpan", "Checkpoint", "Entry", "LazyTensor", "PlaceholderInfo", "TensorEntry", "ValueEntry", "flatten",
           "is_array", "is_tensor"]

MAX_DEPTH = 200


@dataclass(frozen=True)
class LazyTensor:
    """A tensor a reader has located but not read: what :func:`flatten` turns into an entry."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a torch dtype, or its name (a reader that does not import torch)
    nbytes: int
    location: str
    loader: Callable[[], torch.Tensor]
    requires_grad: bool = False
    is_parameter: bool = False
    note: str | None = None
    span: Callable[[], ByteSpan | None] | None = None
    verify: Callable[[], None] | None = None  # the check a loader makes before values are read


class ByteSpan(NamedTuple):
    """Where a tensor's elements lie, dense and in C order, in an uncompressed file.

    ``mapped``: the reader's own mapping of that file, where it keeps one (a
    :class:`~tensorparity.checkpoint._mapped.MappedFile`): the bytes are then read from it
    instead of mapping the file again.
    """

    path: str
    offset: int
    nbytes: int
    mapped: Any = None


@dataclass(frozen=True, repr=False)
class TensorEntry:
    """A tensor in a checkpoint: metadata now, data on :meth:`load`.

    Attributes:
        key: dotted key, e.g. ``state_dict.encoder.layers.0.weight``.
        shape: the tensor's shape.
        dtype: the tensor's dtype, as stored (bf16 and fp8 stay as they are); reading it imports
            torch.
        dtype_name: the same dtype by name (``"float32"``), known without importing torch.
        nbytes: bytes of the tensor's own elements.
        location: where the bytes are (file, member, offset), for humans.
        requires_grad: whether it was saved as requiring grad (when the format records it).
        is_parameter: whether it was saved as an ``nn.Parameter`` (when the format records it).
        note: anything unusual (a meta tensor, a tensor subclass).
    """

    key: str
    shape: tuple[int, ...]
    dtype_name: str  # a torch.dtype given here is kept by its name
    nbytes: int
    location: str
    _loader: Callable[[], torch.Tensor] = field(compare=False)
    requires_grad: bool = False
    is_parameter: bool = False
    note: str | None = None
    _span: Callable[[], ByteSpan | None] | None = field(default=None, compare=False)
    _verify: Callable[[], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype_name, str) or self.dtype_name.startswith("torch."):
            object.__setattr__(self, "dtype_name", dtype_name(self.dtype_name))

    @property
    def dtype(self) -> torch.dtype:
        """The ``torch.dtype`` (imports torch; :attr:`dtype_name` does not)."""
        return to_torch(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        """Read the tensor's data (memory-mapped where the format allows).

        Example:
            >>> import torch
            >>> from tensorparity import open as tp_open
            >>> tp_open({"w": torch.ones(2)})["w"].load()
            tensor([1., 1.])
        """
        return self._loader()

    def byte_span(self) -> ByteSpan | None:
        """The file bytes holding this tensor's elements, when they are dense and in C order.

        Lets comparisons of identical tensors read raw bytes instead of building tensors. The bytes
        are not checked (a trace's shard checksum): equal bytes are equal whatever a checksum says;
        to read them as values, use :meth:`value_span`.
        """
        return self._span() if self._span is not None else None

    def value_span(self) -> ByteSpan | None:
        """:meth:`byte_span` after the checks :meth:`load` makes before values are read (a trace's
        shard checksum): the bytes to measure differences on without building the tensor.

        Raises:
            TensorParityError: what :meth:`load` would raise for the same check.
        """
        if self._verify is not None:
            self._verify()
        return self.byte_span()

    def __repr__(self) -> str:
        return f"TensorEntry({self.key!r}, shape={list(self.shape)}, dtype={self.dtype_name}, nbytes={self.nbytes})"


@dataclass(frozen=True)
class ValueEntry:
    """A non-tensor value: a number, string, list, config, or a not-executed placeholder."""

    key: str
    value: Any

    @property
    def not_executed(self) -> bool:
        return isinstance(self.value, Placeholder)


Entry = TensorEntry | ValueEntry


@dataclass(frozen=True)
class PlaceholderInfo:
    """A global the pickle named and that was not executed."""

    key: str
    name: str
    call: str

    def __str__(self) -> str:
        return f"{self.key}: {self.call} (not executed)"


def is_tensor(value: Any) -> bool:
    """A ``torch.Tensor`` (asked only where torch is imported: if it is not, no value is one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_array(value: Any) -> bool:
    """A numpy array of numbers (asked only where numpy is imported, as :func:`is_tensor`)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray) and value.dtype != np.object_


def _tensor_entry(key: str, value: Any) -> TensorEntry:
    if isinstance(value, LazyTensor):
        return TensorEntry(key, value.shape, value.dtype, value.nbytes, value.location, value.loader,
                           value.requires_grad, value.is_parameter, value.note, value.span, value.verify)
    import torch

    if is_array(value):
        value = torch.from_numpy(value)
    tensor: torch.Tensor = value

    def load(t: torch.Tensor = tensor) -> torch.Tensor:
        return t

    nbytes = tensor.numel() * tensor.element_size()
    location = "in memory" if tensor.device.type == "cpu" else f"in memory on {tensor.device}"
    return TensorEntry(key, tuple(tensor.shape), tensor.dtype, nbytes, location, load,
                       tensor.requires_grad, isinstance(tensor, torch.nn.Parameter))


def _key_part(key: Any) -> str:
    return key if isinstance(key, str) else repr(key) if not isinstance(key, int) else str(key)


def flatten(
    obj: Any,
    *,
    prefix: str = "",
    placeholders: list[PlaceholderInfo] | None = None,
) -> dict[str, Entry]:
    """Flatten nested containers into ``{dotted key: entry}``.

    Dicts contribute their keys, lists and tuples their indices. Tensors (live, numpy, or located
    by a reader as :class:`LazyTensor`) become :class:`TensorEntry`; empty containers and other
    leaves become :class:`ValueEntry`. Placeholders are recorded in ``placeholders`` and their
    contents are walked, so tensors inside them are still found.

    Example:
        >>> import torch
        >>> sorted(flatten({"a": {"b": torch.zeros(1)}, "n": [1, 2], "m": [{"x": 1}]}))
        ['a.b', 'm.0.x', 'n']
    """
    out: dict[str, Entry] = {}
    # Iterative walk: a hostile file cannot exhaust the Python stack.
    stack: list[tuple[str, Any, int]] = [(prefix, obj, 0)]
    while stack:
        key, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(f"structure nests more than {MAX_DEPTH} levels deep", key=key)
        if isinstance(value, LazyTensor) or is_tensor(value) or is_array(value):
            out[key] = _tensor_entry(key, value)
            continue
        children: Mapping[Any, Any] | None = None
        if isinstance(value, Mapping) and value:
            children = value
        elif isinstance(value, (list, tuple)) and value and not _is_plain_list(value):
            # Lists of plain values (betas, param ids, shapes) stay one value; lists holding
            # containers or tensors (param groups, optimizer states) are walked by index.
            children = dict(enumerate(value))
        elif isinstance(value, Placeholder):
            if placeholders is not None:
                placeholders.append(PlaceholderInfo(key, value.name, repr(value).removeprefix("<not executed: ").rstrip(">")))
            out[key] = ValueEntry(key, value)
            inner = placeholder_children(value)
            if any(_holds_tensor(v) for v in inner.values()):
                for name, child in reversed(list(inner.items())):
                    stack.append((f"{key}.{name}" if key else name, child, depth + 1))
            continue
        if children is None:
            out[key] = ValueEntry(key, value)
            continue
        for name, child in reversed(list(children.items())):
            part = _key_part(name)
            stack.append((f"{key}.{part}" if key else part, child, depth + 1))
    return out


_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def _is_plain_list(value: list[Any] | tuple[Any, ...]) -> bool:
    return all(isinstance(v, _SCALARS) for v in value)


def _holds_tensor(value: Any, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, LazyTensor) or is_tensor(value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in value)
    if isinstance(value, Placeholder):
        return any(_holds_tensor(v, depth + 1) for v in placeholder_children(value).values())
    return False


class Checkpoint(Mapping[str, Entry]):
    """A lazy, flat mapping from dotted key to :class:`TensorEntry` or :class:`ValueEntry`.

    Attributes:
        source: the path (or a description of the live object) it was opened from.
        format: the reader that opened it (``torch-zip``, ``lightning``, ``safetensors``, ...).
        sections: key prefix -> section name (``model``, ``optimizer``, ...).
        default_section: the section of keys that no prefix claims.
        provenance: framework, versions, epoch, global step, config where known.
        placeholders: every global a pickle named that was not executed.
        notes: anything a reader wants the user to know.
        structure: the nested object the entries were flattened from (tensors lazy), when the
            reader had one; writers use it to keep the layout (``None``: a flat mapping).

    Example:
        >>> import torch
        >>> from tensorparity import open as tp_open
        >>> ckpt = tp_open(torch.nn.Linear(2, 3))
        >>> list(ckpt), ckpt.num_parameters()
        (['weight', 'bias'], 9)
    """

    def __init__(
        self,
        *,
        source: str,
        format: str,
        entries: dict[str, Entry],
        sections: Mapping[str, str] | None = None,
        provenance: Mapping[str, Any] | None = None,
        placeholders: list[PlaceholderInfo] | None = None,
        notes: list[str] | None = None,
        closers: list[Callable[[], None]] | None = None,
        default_section: str | None = None,
        structure: Any = None,
    ) -> None:
        self.source = source
        self.structure = structure
        self.format = format
        self._entries = entries
        self.sections: dict[str, str] = dict(sections or {})
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.placeholders: list[PlaceholderInfo] = list(placeholders or [])
        self.notes: list[str] = list(notes or [])
        self._closers = list(closers or [])
        # Section of keys no prefix claims: "model" for bare state dicts, "other" otherwise.
        self.default_section = default_section or ("other" if self.sections else "model")

    # Mapping protocol
    def __getitem__(self, key: str) -> Entry:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # Views
    def tensors(self) -> Iterator[TensorEntry]:
        """Every tensor entry, in file order."""
        return (e for e in self._entries.values() if isinstance(e, TensorEntry))

    def values(self) -> Any:  # noqa: D102 - Mapping's, typed loosely for Entry unions
        return self._entries.values()

    def section_of(self, key: str) -> str:
        """The section a key belongs to (``model`` when the format has no sections)."""
        best = ""
        for prefix in self.sections:
            if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > len(best):
                best = prefix
        return self.sections.get(best, self.default_section)

    def section(self, name: str) -> dict[str, Entry]:
        """The entries of one section, keyed as in the checkpoint."""
        return {k: e for k, e in self._entries.items() if self.section_of(k) == name}

    def subtree(self, prefix: str, *, section: str = "model") -> Checkpoint:
        """The entries under ``prefix.``, with the prefix removed, as a checkpoint of its own.

        Example:
            >>> import torch
            >>> from tensorparity import open as tp_open
            >>> list(tp_open({"state_dict": {"w": torch.ones(1)}, "epoch": 1}).subtree("state_dict"))
            ['w']
        """
        cut = len(prefix) + 1
        entries: dict[str, Entry] = {}
        for key, entry in self._entries.items():
            if key.startswith(prefix + "."):
                new = key[cut:]
                entries[new] = replace(entry, key=new)
        placeholders = [p for p in self.placeholders if p.key.startswith(prefix + ".")]
        return Checkpoint(source=f"{self.source}::{prefix}", format=self.format, entries=entries,
                          provenance=self.provenance, placeholders=placeholders, notes=self.notes,
                          default_section=section)

    def weights(self) -> Checkpoint:
        """The model weights alone, keyed as the model names them (``load_state_dict`` keys).

        A Lightning checkpoint's ``state_dict.`` prefix (or a training checkpoint's ``model.``)
        is removed; a bare state dict is returned as it is.
        """
        prefixes = [p for p, name in self.sections.items() if name == "model"]
        if len(prefixes) == 1:
            return self.subtree(prefixes[0])
        if not self.sections:
            return self
        entries = {k: e for k, e in self._entries.items() if self.section_of(k) == "model"}
        return Checkpoint(source=self.source, format=self.format, entries=entries,
                          provenance=self.provenance, notes=self.notes,
                          placeholders=[p for p in self.placeholders if p.key in entries])

    def num_parameters(self, section: str | None = None) -> int:
        """Number of tensor elements, in all sections or in one."""
        return sum(e.numel for e in self.tensors() if section is None or self.section_of(e.key) == section)

    def nbytes(self) -> int:
        """Bytes of all tensors' elements."""
        return sum(e.nbytes for e in self.tensors())

    # Lifetime
    def close(self) -> None:
        """Release open files and mappings. Tensors already loaded stay valid."""
        closers, self._closers = self._closers, []
        for close in closers:
            close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Display
    def __repr__(self) -> str:
        n_tensors = sum(1 for _ in self.tensors())
        extra = f", {len(self.placeholders)} not executed" if self.placeholders else ""
        return (f"<Checkpoint {self.format} {self.source!r}: {n_tensors} tensors, "
                f"{self.num_parameters():,} elements, {self.nbytes():,} bytes{extra}>")

    def _repr_html_(self) -> str:
        from tensorparity.checkpoint._inspect import render_html  # lazy: the inspect view is built on Checkpoint itself

        return render_html(self)
