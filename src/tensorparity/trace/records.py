"""What a trace holds: one record per captured tensor, and the statistics kept for each.

A record names *where* a tensor came from (execution index, module path, call number, module
type, what it is, its place inside nested outputs) and *what* it was (shape, dtype, statistics,
a content hash). In ``full`` mode its data is stored in the trace's safetensors shards under
:attr:`TraceRecord.key`; in ``stats`` mode only the statistics are kept. The manifest is a list
of these records plus provenance (see :mod:`tensorparity.trace.format`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

__all__ = ["KINDS", "Kind", "SCHEMA", "TensorStats", "TraceRecord", "fingerprint", "flatten_value", "json_value", "record_key",
           "same_content", "tensor_stats"]

SCHEMA = "tensorparity.trace/1"

# input: a module's forward input; output: its forward output; grad_output / grad_input: the
# gradient w.r.t. its output / input; param_grad: a parameter's gradient (module = the parameter's
# owner, path = the parameter's name); model_input / model_output: the whole model's.
Kind = Literal["input", "output", "grad_output", "grad_input", "param_grad", "model_input", "model_output"]
KINDS: tuple[str, ...] = ("input", "output", "grad_output", "grad_input", "param_grad", "model_input", "model_output")


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor, computed where the tensor lives (on its device), in float64."""

    numel: int
    min: float
    max: float
    mean: float
    std: float
    norm: float
    nan: int
    inf: int
    hash: str  # content fingerprint (see fingerprint()), "" when not computed

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, float) and (v != v or abs(v) == float("inf")) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorStats:
        # Fields a newer minor schema version adds are ignored; the known ones are required.
        names = [f.name for f in fields(cls)]
        return cls(**{k: (float(data[k]) if k in ("min", "max", "mean", "std", "norm") else data[k]) for k in names})


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POSITIONS: dict[tuple[int, str], torch.Tensor] = {}
_POSITIONS_LIMIT = 1 << 24  # cache position weights for tensors up to 16M elements


def _positions(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    weights = _POSITIONS.get(key)
    if weights is None:
        # Odd multipliers of a Weyl sequence: every position weighs differently, so a permuted or
        # transposed tensor changes the fingerprint even though its sum does not.
        weights = torch.arange(n, device=device, dtype=torch.int64) * 0x9E3779B97F4A7C15 % (1 << 62) * 2 + 1
        if n <= _POSITIONS_LIMIT:
            if sum(w.numel() for w in _POSITIONS.values()) + n > 4 * _POSITIONS_LIMIT:
                _POSITIONS.clear()
            _POSITIONS[key] = weights
    return weights


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """The elements' bytes as the widest integer type that divides them (int64 for most tensors).
    The width depends on the byte count only, never on where the tensor starts in its storage."""
    raw = flat.view(torch.uint8)
    width = next((w for w in (8, 4, 2) if raw.numel() % w == 0), 1)
    if width == 1:
        return raw
    try:
        return raw.view(_INT_VIEW[width])
    except RuntimeError:  # a view starting at a misaligned offset: an aligned copy
        return raw.clone().view(_INT_VIEW[width])


def fingerprint(t: torch.Tensor) -> str:
    """A content fingerprint computed where the tensor lives (no copy to the CPU): wrapping sums of
    the elements' bit patterns, read as 64-bit integers (narrower where the byte count demands) —
    all of them, and position-weighted sums of the rows and columns of the words laid out in
    blocks of 1024.

    Equal tensors always agree (integer sums wrap the same way on every device and in every
    order); different ones disagree unless their bit patterns collide in every sum, which
    accidental differences (a changed element, a swapped pair, a transposed or permuted weight) do
    not. It is a fingerprint for "these are the same numbers", not a cryptographic hash. The sums
    run in the words' own integer type (a widening sum is ten times slower on CPUs), so it costs
    about two passes at memory speed. ``fp2:`` fingerprints are only ever compared with ``fp2:``.

    Example:
        >>> a = torch.arange(6.0).reshape(2, 3)
        >>> fingerprint(a) == fingerprint(a.clone()), fingerprint(a) == fingerprint(a.t().contiguous())
        (True, False)
    """
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return "fp2:" + "0" * 32
    bits = _bits(flat)
    if bits.element_size() < 4:  # rare (odd byte counts): widen, these sums wrap too narrowly
        bits = bits.to(torch.int32)
    kind = bits.dtype
    n = bits.numel()
    block = 1024
    whole = n - n % block
    plain = 0
    weighted = 0
    if whole:
        grid = bits[:whole].view(-1, block)
        rows = grid.sum(1, dtype=kind)
        cols = grid.sum(0, dtype=kind)
        plain += int(rows.sum(dtype=kind))
        weighted += int((rows.to(torch.int64) * _positions(rows.numel(), rows.device)).sum())
        weighted += 31 * int((cols.to(torch.int64) * _positions(block, cols.device)).sum())
    if whole < n:
        tail = bits[whole:].to(torch.int64)
        plain += int(tail.sum())
        weighted += 17 * int((tail * _positions(tail.numel(), tail.device)).sum())
    return f"fp2:{plain & (2**64 - 1):016x}{weighted & (2**64 - 1):016x}"


def same_content(a: str, b: str) -> bool | None:
    """Whether two fingerprints say "equal content"; ``None`` when they cannot tell (one missing,
    or made by different fingerprint versions)."""
    if not a or not b or a.split(":", 1)[0] != b.split(":", 1)[0]:
        return None
    return a == b


def _sum(x: torch.Tensor) -> torch.Tensor:
    # float32 sums are cascaded (pairwise) by torch, accurate to a few ulps of the result; a
    # float64 accumulator would cost a widening pass, three times slower.
    return x.sum() if x.dtype == torch.float32 else x.sum(dtype=torch.float64)


def tensor_stats(t: torch.Tensor, *, with_hash: bool = True) -> TensorStats:
    """Statistics of ``t`` over its finite elements (NaN/Inf are counted, not averaged), computed
    where the tensor lives in a few passes (float32 arithmetic for 16/32-bit floats, float64 for
    64-bit and integer types).

    Example:
        >>> s = tensor_stats(torch.tensor([1.0, 3.0, float("nan")]))
        >>> (s.min, s.max, s.mean, s.nan)
        (1.0, 3.0, 2.0, 1)
    """
    t = t.detach()
    numel = t.numel()
    digest = fingerprint(t) if with_hash else ""
    if numel == 0:
        return TensorStats(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, digest)
    if t.is_complex():
        x = t.abs().to(torch.float64)
    elif t.dtype in (torch.float32, torch.float64):
        x = t
    elif t.is_floating_point():
        x = t.to(torch.float32)
    else:
        x = t.to(torch.float64)
    x = x.reshape(-1)
    nan = inf = 0
    low, high = torch.aminmax(x)
    total = float(_sum(x))
    if not (math.isfinite(float(low)) and math.isfinite(float(high)) and math.isfinite(total)):
        # NaN propagates into min/max and the sum, Inf into min or max: only then look closer.
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return TensorStats(numel, float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), nan, inf,
                               digest)
        low, high = torch.aminmax(x)
        total = float(_sum(x))
    n = x.numel()
    squares = max(0.0, float(torch.dot(x, x)))  # BLAS: twice vector_norm's speed
    norm = math.sqrt(squares)
    mean = total / n
    var = max(0.0, squares / n - mean * mean)
    return TensorStats(numel, float(low), float(high), mean, math.sqrt(var), norm, nan, inf, digest)


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

    @property
    def key(self) -> str:
        return record_key(self.module, self.call, self.kind, self.path)

    @property
    def layer(self) -> str:
        """The layer this record belongs to, as reports name it: ``module`` or ``module#call``."""
        name = self.module or "<model>"
        return name if self.call == 0 else f"{name}#{self.call}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["stats"] = self.stats.to_dict() if self.stats else None
        data["key"] = self.key
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceRecord:
        stats = TensorStats.from_dict(data["stats"]) if data.get("stats") else None
        return cls(index=int(data["index"]), module=str(data["module"]), call=int(data["call"]),
                   module_type=str(data["module_type"]), kind=str(data["kind"]), path=str(data["path"]),
                   shape=tuple(int(s) for s in data["shape"]), dtype=str(data["dtype"]),
                   device=str(data["device"]), stats=stats, stored=bool(data["stored"]),
                   value=data.get("value"), is_tensor=bool(data.get("is_tensor", True)))
