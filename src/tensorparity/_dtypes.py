"""Dtypes by name, without importing torch.

Checkpoint metadata (a safetensors header, a torch zip's pickle) names its dtypes; reading that
metadata, inspecting it and comparing raw bytes need each dtype's size and kind, not torch itself
(whose import costs over a second). A dtype is named as torch names it (``"float32"``,
``"bfloat16"``, ``"float8_e4m3fn"``); :func:`to_torch` gives the ``torch.dtype`` when a tensor is
built. Names this table does not hold are asked of torch, so a dtype added by a later torch works.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

__all__ = ["DTypeInfo", "TorchDType", "dtype_info", "dtype_name", "is_dtype_name", "to_torch"]


class DTypeInfo(NamedTuple):
    """What a comparison needs to know of a dtype: bytes per element, kind, and float eps.

    ``kind``: ``"f"`` floating point, ``"c"`` complex, ``"i"`` signed integer, ``"u"`` unsigned
    integer, ``"b"`` bool, ``"q"`` quantized, ``"x"`` bits or anything else.
    """

    itemsize: int
    kind: str
    eps: float = 0.0

    @property
    def is_floating_point(self) -> bool:
        return self.kind == "f"

    @property
    def is_complex(self) -> bool:
        return self.kind == "c"


_TABLE: dict[str, DTypeInfo] = {
    "float64": DTypeInfo(8, "f", 2.220446049250313e-16),
    "float32": DTypeInfo(4, "f", 1.1920928955078125e-07),
    "float16": DTypeInfo(2, "f", 0.0009765625),
    "bfloat16": DTypeInfo(2, "f", 0.0078125),
    "float8_e4m3fn": DTypeInfo(1, "f", 0.125),
    "float8_e4m3fnuz": DTypeInfo(1, "f", 0.125),
    "float8_e5m2": DTypeInfo(1, "f", 0.25),
    "float8_e5m2fnuz": DTypeInfo(1, "f", 0.125),
    "float8_e8m0fnu": DTypeInfo(1, "f", 1.0),
    "complex128": DTypeInfo(16, "c"),
    "complex64": DTypeInfo(8, "c"),
    "complex32": DTypeInfo(4, "c"),
    "int64": DTypeInfo(8, "i"),
    "int32": DTypeInfo(4, "i"),
    "int16": DTypeInfo(2, "i"),
    "int8": DTypeInfo(1, "i"),
    "uint64": DTypeInfo(8, "u"),
    "uint32": DTypeInfo(4, "u"),
    "uint16": DTypeInfo(2, "u"),
    "uint8": DTypeInfo(1, "u"),
    "bool": DTypeInfo(1, "b"),
    "qint8": DTypeInfo(1, "q"),
    "qint32": DTypeInfo(4, "q"),
    "quint8": DTypeInfo(1, "q"),
    "quint4x2": DTypeInfo(1, "q"),
    "quint2x4": DTypeInfo(1, "q"),
    "float4_e2m1fn_x2": DTypeInfo(1, "f"),  # two 4-bit floats per byte; no finfo
    **{f"int{bits}": DTypeInfo(1, "i") for bits in range(1, 8)},  # sub-byte, one per byte as stored
    **{f"uint{bits}": DTypeInfo(1, "u") for bits in range(1, 8)},
    "bits8": DTypeInfo(1, "x"), "bits16": DTypeInfo(2, "x"), "bits1x8": DTypeInfo(1, "x"),
    "bits2x4": DTypeInfo(1, "x"), "bits4x2": DTypeInfo(1, "x"),
}


class TorchDType:
    """A ``torch.<name>`` dtype named by a pickle, read without importing torch.

    Prints as torch prints it (``torch.float32``) and equals the ``torch.dtype`` of that name;
    :func:`to_torch` turns it into one. It hashes by its name (torch's dtypes hash by identity),
    so as a dict key or set member it does not find torch's dtype: convert it first. Immutable: a
    pickle's BUILD cannot change it.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"torch.{self.name} is read-only")

    def __setstate__(self, state: Any) -> None:
        raise AttributeError(f"torch.{self.name} is read-only")

    def __reduce__(self) -> Any:
        return (TorchDType, (self.name,))

    @property
    def itemsize(self) -> int:
        return dtype_info(self.name).itemsize

    @property
    def is_floating_point(self) -> bool:
        return dtype_info(self.name).is_floating_point

    @property
    def is_complex(self) -> bool:
        return dtype_info(self.name).is_complex

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TorchDType):
            return other.name == self.name
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(other, torch.dtype):
            return dtype_name(other) == self.name
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("torch dtype", self.name))

    def __repr__(self) -> str:
        return f"torch.{self.name}"


def is_dtype_name(name: str) -> bool:
    """Whether torch has a dtype of this name (asks torch only for names the table lacks)."""
    if name in _TABLE:
        return True
    if not name.isidentifier() or not name.islower():
        return False
    try:
        dtype_info(name)
    except (ValueError, ImportError):
        return False
    return True


def dtype_name(dtype: Any) -> str:
    """``torch.float32``, ``"torch.float32"`` or ``"float32"`` -> ``"float32"``.

    Example:
        >>> dtype_name("torch.bfloat16")
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def dtype_info(dtype: Any) -> DTypeInfo:
    """Size, kind and eps of a dtype given by name (or as a ``torch.dtype``).

    Raises:
        ValueError: torch has no dtype of that name.

    Example:
        >>> dtype_info("bfloat16").itemsize
        2
    """
    name = dtype.name if isinstance(dtype, TorchDType) else dtype_name(dtype)
    info = _TABLE.get(name)
    if info is None:  # a dtype this table does not know: ask torch (imported only now)
        d = to_torch(name)
        kind = "f" if d.is_floating_point else "c" if d.is_complex else "x"
        eps = 0.0
        if kind == "f":
            import torch

            try:
                eps = float(torch.finfo(d).eps)
            except (TypeError, RuntimeError):  # packed types (float4_e2m1fn_x2) have no finfo
                eps = 0.0
        info = _TABLE[name] = DTypeInfo(d.itemsize, kind, eps)
    return info


def to_torch(dtype: Any) -> Any:
    """The ``torch.dtype`` of a name (imports torch).

    Raises:
        ValueError: torch has no dtype of that name.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype.name if isinstance(dtype, TorchDType) else dtype_name(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"torch has no dtype {dtype!r}")
    return value
