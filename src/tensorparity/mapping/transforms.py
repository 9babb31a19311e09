"""Tensor transforms between two key spaces: small frozen objects behind one Protocol.

A transform turns the tensors one rule reads (one or several keys of side A) into the tensors it
writes (one or several keys of side B). Each is pure, knows its inverse, describes itself in a
few words and serialises to the dict the YAML loader reads back. They are found by name in the
loader's registry, so a project can add its own with
:func:`~tensorparity.mapping.loader.register_transform`. This module holds the protocol and the
transforms of one tensor at a time; :mod:`.multi` those of several (concat, split, chain).

Shapes are never guessed: a rule's transform runs once on ``device="meta"`` tensors to learn the
output shapes (or the exact einops/torch error) before any data is read. Information only a
checkpoint can give (the sizes a ``concat`` joined, the shape a ``reshape`` started from, the
dtype a ``cast`` left) is recorded by :meth:`Transform.bind`, which is what makes such
transforms invertible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol, runtime_checkable

import einops
import torch
from einops.parsing import ParsedExpression

__all__ = ["Cast", "NotInvertibleError", "Permute", "Rearrange", "Reshape", "Transform", "TransformSpecError",
           "Transpose", "parse_dtype"]


class TransformSpecError(ValueError):
    """A transform was given wrong arguments; the loader turns it into a mapping problem."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message, self.fix = message, fix


class NotInvertibleError(TransformSpecError):
    """The transform has no inverse (yet: binding to a checkpoint may give it one)."""


@runtime_checkable
class Transform(Protocol):
    """What every transform provides. ``apply`` must also work on ``meta`` tensors: that is how
    output shapes are inferred without reading data.

    - ``lossy``: applying it and then its inverse may not give the input back bit for bit.
    - ``apply(tensors)``: the rule's input tensors -> its output tensors.
    - ``inverse()``: the transform that undoes it; raises :class:`NotInvertibleError`.
    - ``out_count(n_in)``: how many tensors ``n_in`` inputs become (``None``: as the rule asks).
    - ``fit(n_in, n_out)``: check (and complete) it for a rule of ``n_in`` -> ``n_out`` keys.
    - ``bind(inputs)``: record what the inverse needs, from concrete (meta) inputs.
    - ``describe()``: a few words for humans; ``to_dict()``: the spec the loader reads back.
    """

    name: ClassVar[str]

    @property
    def lossy(self) -> bool: ...
    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...
    def inverse(self) -> Transform: ...
    def out_count(self, n_in: int) -> int | None: ...
    def fit(self, n_in: int, n_out: int) -> Transform: ...
    def bind(self, inputs: Sequence[torch.Tensor]) -> Transform: ...
    def describe(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


# --- helpers -------------------------------------------------------------------------------------

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
                  "fp32": "float32", "f32": "float32", "float": "float32", "fp64": "float64",
                  "f64": "float64", "double": "float64"}


def parse_dtype(value: Any) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"`` or ``"torch.bfloat16"`` -> ``torch.bfloat16``.

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise TransformSpecError(f"unknown dtype {value!r}",
                                 "use a torch dtype name: float32, bfloat16, float16, float8_e4m3fn, int64, ...")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TransformSpecError(f"{what} must be an integer, got {value!r}", f"write {what} as a whole number")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise TransformSpecError(f"{what} must be a non-empty list of integers, got {value!r}",
                                 f"write {what} as a list, e.g. [0, 1]")
    return tuple(_int(v, what) for v in value)


def _args(value: Any, extra: dict[str, Any], primary: str, allowed: set[str]) -> dict[str, Any]:
    """Spec arguments: ``{name: {k: v}}``, ``{name: v, k: v}`` (``v`` is the primary argument)."""
    args = dict(value) if isinstance(value, dict) else ({} if value is None else {primary: value})
    args.update(extra)
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise TransformSpecError(f"unknown argument(s) {', '.join(unknown)}",
                                 f"use only {', '.join(sorted(allowed))}")
    return args


def _elementwise_fit(t: Transform, n_in: int, n_out: int) -> Transform:
    if n_in != n_out:
        raise TransformSpecError(f"{t.name} turns each key into one key, but the rule has {n_in} a key(s) "
                                 f"and {n_out} b key(s)",
                                 "give a and b the same number of keys, or chain a concat/split")
    return t


def _check_ndim(t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{what} needs a {ndim}-d tensor, got shape {list(t.shape)}")


# --- transforms ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rearrange:
    """An einops ``rearrange`` pattern with fixed axis sizes; inverse: the swapped pattern.

    Example:
        >>> t = Rearrange("(h two d) c -> (h d two) c", (("h", 2), ("two", 2)))
        >>> t.apply([torch.arange(8.).view(8, 1)])[0].flatten().tolist()
        [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """

    pattern: str
    sizes: tuple[tuple[str, int], ...] = ()
    name: ClassVar[str] = "rearrange"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or self.pattern.count("->") != 1:
            raise TransformSpecError(f"rearrange pattern {self.pattern!r} needs exactly one '->'",
                                     "write it as einops does, e.g. '(h two d) c -> (h d two) c'")
        left, right = (s.strip() for s in self.pattern.split("->"))
        try:
            lhs, rhs = _parsed(left), _parsed(right)
        except einops.EinopsError as exc:
            raise TransformSpecError(f"rearrange pattern {self.pattern!r} does not parse: {exc}",
                                     "use axis names, parentheses for groups and '...' once per side") from None
        if lhs.identifiers != rhs.identifiers:
            diff = sorted(lhs.identifiers ^ rhs.identifiers)
            raise TransformSpecError(f"rearrange pattern {self.pattern!r}: axes {', '.join(diff)} appear on one "
                                     "side only",
                                     "rearrange only moves axes: name the same axes on both sides")
        sizes = tuple(sorted(dict(self.sizes).items()))
        for axis, size in sizes:
            if axis not in lhs.identifiers:
                raise TransformSpecError(f"axis size {axis}={size} names no axis of {self.pattern!r}",
                                         f"size only the pattern's axes: {', '.join(sorted(lhs.identifiers - {'…'}))}")
            if _int(size, f"axis size {axis}") <= 0:
                raise TransformSpecError(f"axis size {axis}={size} is not positive", "give a positive size")
        object.__setattr__(self, "sizes", sizes)

    lossy: ClassVar[bool] = False

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [einops.rearrange(t, self.pattern, **dict(self.sizes)) for t in tensors]

    def inverse(self) -> Rearrange:
        left, right = self.pattern.split("->")
        return Rearrange(f"{right.strip()} -> {left.strip()}", self.sizes)

    def out_count(self, n_in: int) -> int:
        return n_in

    def fit(self, n_in: int, n_out: int) -> Transform:
        return _elementwise_fit(self, n_in, n_out)

    def bind(self, inputs: Sequence[torch.Tensor]) -> Rearrange:
        # The inverse reads the right side as its input: each group there may hold at most one
        # axis of unknown size. Record the sizes of the others, solved from the input's shape.
        left, right = (_parsed(s.strip()) for s in self.pattern.split("->"))
        if left.has_ellipsis or not inputs:
            return self
        known = dict(self.sizes)
        solved: dict[str, int] = {}
        for t in inputs:
            if t.dim() != len(left.composition):
                return self
            for group, dim in zip(left.composition, t.shape):
                unknown = [a for a in group if a not in known]
                if len(unknown) == 1:
                    rest = 1
                    for a in group:
                        rest *= known.get(a, 1)
                    if rest and dim % rest == 0:
                        value = dim // rest
                        if solved.setdefault(unknown[0], value) != value:
                            return self  # inputs disagree: leave it to the inverse's own check
        needed = {}
        for group in right.composition:
            if isinstance(group, list):
                missing = [a for a in group if a not in known]
                if len(missing) > 1:
                    needed.update({a: solved[a] for a in missing[1:] if a in solved})
        return replace(self, sizes=tuple(sorted({**known, **needed}.items()))) if needed else self

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes)
        return f"rearrange '{self.pattern}'" + (f" ({sizes})" if sizes else "")

    def to_dict(self) -> dict[str, Any]:
        return {"rearrange": self.pattern, **dict(self.sizes)}


@functools.lru_cache(maxsize=512)
def _parsed(side: str) -> ParsedExpression:
    """One side of an einops pattern, parsed once (a compare binds the same rules thousands of
    times); read, never changed."""
    return ParsedExpression(side)


@dataclass(frozen=True)
class Transpose:
    """Swap two dimensions (a ``Conv1D`` ↔ ``Linear`` weight); its own inverse.

    Example:
        >>> Transpose(0, 1).apply([torch.zeros(2, 3)])[0].shape
        torch.Size([3, 2])
    """

    dim0: int = 0
    dim1: int = 1
    name: ClassVar[str] = "transpose"

    lossy: ClassVar[bool] = False

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.transpose(self.dim0, self.dim1) for t in tensors]

    def inverse(self) -> Transpose:
        return self

    def out_count(self, n_in: int) -> int:
        return n_in

    def fit(self, n_in: int, n_out: int) -> Transform:
        return _elementwise_fit(self, n_in, n_out)

    def bind(self, inputs: Sequence[torch.Tensor]) -> Transpose:
        return self

    def describe(self) -> str:
        return f"transpose dims {self.dim0} and {self.dim1}"

    def to_dict(self) -> dict[str, Any]:
        return {"transpose": [self.dim0, self.dim1]}


@dataclass(frozen=True)
class Permute:
    """Reorder all dimensions; inverse: the inverse permutation.

    Example:
        >>> Permute((2, 0, 1)).inverse()
        Permute(dims=(1, 2, 0))
    """

    dims: tuple[int, ...]
    name: ClassVar[str] = "permute"

    def __post_init__(self) -> None:
        dims = _ints(self.dims, "permute dims")
        if sorted(dims) != list(range(len(dims))):
            raise TransformSpecError(f"permute dims {list(dims)} are not a permutation of 0..{len(dims) - 1}",
                                     "list every dimension once, counting from 0")
        object.__setattr__(self, "dims", dims)

    lossy: ClassVar[bool] = False

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for t in tensors:
            _check_ndim(t, len(self.dims), f"permute {list(self.dims)}")
        return [t.permute(self.dims) for t in tensors]

    def inverse(self) -> Permute:
        inv = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inv[d] = i
        return Permute(tuple(inv))

    def out_count(self, n_in: int) -> int:
        return n_in

    def fit(self, n_in: int, n_out: int) -> Transform:
        return _elementwise_fit(self, n_in, n_out)

    def bind(self, inputs: Sequence[torch.Tensor]) -> Permute:
        return self

    def describe(self) -> str:
        return f"permute dims to {list(self.dims)}"

    def to_dict(self) -> dict[str, Any]:
        return {"permute": list(self.dims)}


@dataclass(frozen=True)
class Reshape:
    """Reshape to ``shape`` (one ``-1`` allowed); invertible once ``source_shape`` is known.

    Example:
        >>> Reshape((6,)).bind([torch.empty(2, 3, device="meta")]).inverse()
        Reshape(shape=(2, 3), source_shape=(6,))
    """

    shape: tuple[int, ...]
    source_shape: tuple[int, ...] | None = None
    name: ClassVar[str] = "reshape"

    def __post_init__(self) -> None:
        shape = _ints(self.shape, "reshape shape")
        if shape.count(-1) > 1 or any(d < -1 for d in shape):
            raise TransformSpecError(f"reshape shape {list(shape)} is not a shape",
                                     "use non-negative sizes and at most one -1")
        object.__setattr__(self, "shape", shape)
        if self.source_shape is not None:
            src = _ints(self.source_shape, "reshape source_shape")
            if any(d < 0 for d in src):
                raise TransformSpecError(f"reshape source_shape {list(src)} has a negative size",
                                         "give the full source shape")
            object.__setattr__(self, "source_shape", src)

    lossy: ClassVar[bool] = False

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for t in tensors:
            if self.source_shape is not None and tuple(t.shape) != self.source_shape:
                raise ValueError(f"reshape expects shape {list(self.source_shape)}, got {list(t.shape)}")
        return [t.reshape(self.shape) for t in tensors]

    def inverse(self) -> Reshape:
        if self.source_shape is None:
            raise NotInvertibleError(
                f"reshape to {list(self.shape)} cannot be undone without the shape it started from",
                "bind the mapping to a checkpoint of side A first (Mapping.bind(ckpt), or use "
                "apply_mapping(...).mapping), or give the reshape a source_shape")
        shape = self.shape
        if -1 in shape:  # the inverse checks its input fully: resolve the -1 from the source
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(math.prod(self.source_shape) // known if d == -1 and known else d for d in shape)
        return Reshape(self.source_shape, shape)

    def out_count(self, n_in: int) -> int:
        return n_in

    def fit(self, n_in: int, n_out: int) -> Transform:
        return _elementwise_fit(self, n_in, n_out)

    def bind(self, inputs: Sequence[torch.Tensor]) -> Reshape:
        shapes = {tuple(t.shape) for t in inputs}
        if len(shapes) != 1 or self.source_shape is not None:
            return self
        return replace(self, source_shape=shapes.pop())

    def describe(self) -> str:
        return f"reshape to {list(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        if self.source_shape is None:
            return {"reshape": list(self.shape)}
        return {"reshape": {"shape": list(self.shape), "source_shape": list(self.source_shape)}}


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of ``src`` is exactly representable in ``dst``."""
    if src == dst:
        return True
    if src.is_floating_point and dst.is_floating_point:
        fs, fd = torch.finfo(src), torch.finfo(dst)
        return fd.bits >= fs.bits and fd.eps <= fs.eps and fd.max >= fs.max and fd.smallest_normal <= fs.smallest_normal
    if not src.is_floating_point and not dst.is_floating_point and torch.bool not in (src, dst):
        if src.is_complex or dst.is_complex:
            return False
        is_, id_ = torch.iinfo(src), torch.iinfo(dst)
        return id_.min <= is_.min and id_.max >= is_.max
    return False


@dataclass(frozen=True)
class Cast:
    """Change the dtype; inverse casts back to ``source`` (known once bound).

    Example:
        >>> Cast(torch.bfloat16).bind([torch.empty(2, device="meta")]).inverse()
        Cast(dtype=torch.float32, source=torch.bfloat16)
    """

    dtype: torch.dtype
    source: torch.dtype | None = None
    name: ClassVar[str] = "cast"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.source is not None:
            object.__setattr__(self, "source", parse_dtype(self.source))

    @property
    def lossy(self) -> bool:
        return self.source is None or not _widens(self.source, self.dtype)

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for t in tensors:
            if self.source is not None and t.dtype != self.source:
                raise ValueError(f"cast expects {_dtype_name(self.source)} input, got {_dtype_name(t.dtype)}")
        return [t.to(self.dtype) for t in tensors]

    def inverse(self) -> Cast:
        if self.source is None:
            raise NotInvertibleError(
                f"cast to {_dtype_name(self.dtype)} cannot be undone without the dtype it started from",
                "bind the mapping to a checkpoint of side A first (Mapping.bind(ckpt)), or write "
                f"{{cast: {{dtype: {_dtype_name(self.dtype)}, from: float32}}}}")
        return Cast(self.source, self.dtype)

    def out_count(self, n_in: int) -> int:
        return n_in

    def fit(self, n_in: int, n_out: int) -> Transform:
        return _elementwise_fit(self, n_in, n_out)

    def bind(self, inputs: Sequence[torch.Tensor]) -> Cast:
        dtypes = {t.dtype for t in inputs}
        if len(dtypes) != 1 or self.source is not None:
            return self
        return replace(self, source=dtypes.pop())

    def describe(self) -> str:
        src = f" from {_dtype_name(self.source)}" if self.source is not None else ""
        return f"cast{src} to {_dtype_name(self.dtype)}" + (" (lossy)" if self.lossy else "")

    def to_dict(self) -> dict[str, Any]:
        if self.source is None:
            return {"cast": _dtype_name(self.dtype)}
        return {"cast": {"dtype": _dtype_name(self.dtype), "from": _dtype_name(self.source)}}
