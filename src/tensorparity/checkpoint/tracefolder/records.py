"""What a trace holds: one record per captured tensor (its statistics: :mod:`tensorparity.checkpoint.tracefolder.stats`).

A record names *where* a tensor came from (execution index, module path, call number, module
type, what it is, its place inside nested outputs) and *what* it was (shape, dtype, statistics,
a content hash). In ``full`` mode its data is stored in the trace's safetensors shards under
:attr:`TraceRecord.key`; in ``stats`` mode only the statistics are kept. The manifest is a list
of these records plus provenance (see :mod:`tensorparity.checkpoint.tracefolder.format`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tensorparity.checkpoint.tracefolder.stats import TensorStats, fingerprint, same_content, tensor_stats

__all__ = ["KINDS", "Kind", "SCHEMA", "TensorStats", "TraceRecord", "fingerprint", "flatten_value", "json_value", "record_key",
           "same_content", "tensor_stats"]

SCHEMA = "tensorparity.trace/1"

# input: a module's forward input; output: its forward output; grad_output / grad_input: the
# gradient w.r.t. its output / input; param_grad: a parameter's gradient (module = the parameter's
# owner, path = the parameter's name); model_input / model_output: the whole model's; param: a
# parameter's value as the first forward used it (module = owner, path = name, call 0), once per
# capture: it belongs to no module call, so layers and alignment leave it out; param_signature: where
# a parameter is not stored (stats mode), its content signature (row and column digests, int64,
# see tensorparity.mapping.param_signature), stored, so a mapping can still be found from it;
# param_grad_local: with local_grads=True, a parameter's gradient as this rank's backward
# accumulated it, before DDP's all-reduce (param_grad is the one the optimizer steps on).
Kind = Literal["input", "output", "grad_output", "grad_input", "param_grad", "model_input", "model_output", "param",
               "param_signature", "param_grad_local"]
KINDS: tuple[str, ...] = ("input", "output", "grad_output", "grad_input", "param_grad", "model_input", "model_output",
                          "param", "param_signature", "param_grad_local")


def json_value(value: Any) -> Any:
    """A non-tensor leaf as the manifest keeps it (JSON scalars as they are, anything else as repr)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value if not isinstance(value, str) else value[:1000]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return repr(value)[:200]


def flatten_value(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten a nested input/output into ``(path, leaf)`` pairs, tensors and other values.

    Tuples and lists contribute indices, mappings (also Hugging Face ``ModelOutput``) their keys,
    named tuples and dataclasses their field names.

    Example:
        >>> flatten_value((torch.ones(1), {"a": 2, "b": [None]}))
        [('0', tensor([1.])), ('1.a', 2), ('1.b.0', None)]
    """
    out: list[tuple[str, Any]] = []

    def walk(value: Any, path: str, depth: int) -> None:
        if isinstance(value, torch.Tensor) or depth > 32:
            out.append((path, value))
            return
        items: Any = None
        if isinstance(value, Mapping):
            items = value.items()
        elif isinstance(value, tuple) and hasattr(value, "_fields"):
            items = zip(value._fields, value)
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        if items is None:
            out.append((path, value))
            return
        items = list(items)
        if not items:
            out.append((path, value))
        for key, child in items:
            part = str(key).replace("/", "_")  # "/" separates the parts of a record key
            walk(child, f"{path}.{part}" if path else part, depth + 1)

    walk(obj, prefix, 0)
    return out


def record_key(module: str, call: int, kind: str, path: str = "") -> str:
    """The key a record's tensor is stored under: ``module/call/kind[/path]``.

    Module paths contain dots, never slashes, so the key splits back unambiguously.

    Example:
        >>> record_key("encoder.layers.0", 1, "output", "0")
        'encoder.layers.0/1/output/0'
    """
    base = f"{module or '<model>'}/{call}/{kind}"
    return f"{base}/{path}" if path else base


@dataclass(frozen=True)
class TraceRecord:
    """One captured tensor (or non-tensor value).

    Attributes:
        index: execution index: the order in which records were captured (forward, then backward).
        module: the module's path in the model (``""`` for the model itself).
        call: which call of that module (0 for the first; a module called twice has calls 0 and 1).
        module_type: the module's class, ``package.module.Class``.
        kind: what it is (see :data:`KINDS`).
        path: its place inside nested inputs/outputs (``"0"``, ``"last_hidden_state"``, ``"1.a"``).
        shape, dtype: as captured (bf16/fp8 kept as they are).
        device: where it lived.
        stats: statistics and content hash.
        stored: whether the full tensor is in the shards (under :attr:`key`).
        value: a non-tensor output (a number, string, None), kept as a value; ``shape`` is then ().
        placement: for a DTensor (FSDP2, tensor parallel): ``mesh`` (its shape), ``placements``
            (``Shard(0)``, ``Replicate()``, ``Partial(sum)``), ``global_shape``, and either
            ``offset`` (where this rank's local shard, the recorded tensor, starts in the global
            tensor: ``dtensor="local"``) or ``gathered: true`` (the recorded tensor is the full
            one: ``dtensor="gather"``); ``None`` for a plain tensor.
    """

    index: int
    module: str
    call: int
    module_type: str
    kind: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    stats: TensorStats | None
    stored: bool
    value: Any = field(default=None)
    is_tensor: bool = True
    placement: dict[str, Any] | None = field(default=None, compare=False)

    @functools.cached_property
    def key(self) -> str:  # cached: a compare asks each record's key a dozen times
        return record_key(self.module, self.call, self.kind, self.path)

    @property
    def layer(self) -> str:
        """The layer this record belongs to, as reports name it: ``module`` or ``module#call``."""
        name = self.module or "<model>"
        return name if self.call == 0 else f"{name}#{self.call}"

    def to_dict(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict: its deep copy cost ~30 us a record, 20 ms per
        # capture of a small model, at the block's exit.
        data = {f: getattr(self, f) for f in _RECORD_FIELDS}
        data["shape"] = list(self.shape)
        data["stats"] = self.stats.to_dict() if self.stats else None
        data["key"] = self.key
        if self.placement is None:
            del data["placement"]  # plain tensors: the manifest stays as it was
        else:
            data["placement"] = copy.deepcopy(self.placement)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceRecord:
        stats = TensorStats.from_dict(data["stats"]) if data.get("stats") else None
        # Set as the frozen dataclass's __init__ would, without an object.__setattr__ per field.
        out = object.__new__(cls)
        out.__dict__.update(
            index=int(data["index"]), module=str(data["module"]), call=int(data["call"]),
            module_type=str(data["module_type"]), kind=str(data["kind"]), path=str(data["path"]),
            shape=tuple(int(s) for s in data["shape"]), dtype=str(data["dtype"]), device=str(data["device"]),
            stats=stats, stored=bool(data["stored"]), value=data.get("value"),
            is_tensor=bool(data.get("is_tensor", True)),
            placement=data["placement"] if isinstance(data.get("placement"), dict) else None)
        return out


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(TraceRecord))  # to_dict reads them by name
