"""Transforms over several tensors: ``concat`` (fused ``qkv`` from ``q``, ``k``, ``v``), its
inverse ``split``, and ``chain`` (several transforms in a row)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from tensorparity.mapping.transforms import Transform, TransformSpecError, _int, _ints

__all__ = ["Chain", "Concat", "Split"]


def _meta_cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat`` for meta tensors: the same checks, without the ~1.5 s import of
    ``torch._dynamo`` that torch's meta kernel for ``cat`` triggers on first use."""
    first, nd = tensors[0], tensors[0].dim()
    d = dim + nd if dim < 0 else dim
    if not 0 <= d < nd:
        raise ValueError(f"dim {dim} is out of range for {nd}-d tensors")
    for n, t in enumerate(tensors):
        if t.dim() != nd:
            raise ValueError(f"tensor {n} has {t.dim()} dims, tensor 0 has {nd}")
        for axis in range(nd):
            if axis != d and t.shape[axis] != first.shape[axis]:
                raise ValueError(f"sizes must match except along dim {d}: tensor {n} has {t.shape[axis]} in dim "
                                 f"{axis}, tensor 0 has {first.shape[axis]}")
    shape = list(first.shape)
    shape[d] = sum(t.shape[d] for t in tensors)
    dtype = first.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.empty(shape, dtype=dtype, device="meta")


@dataclass(frozen=True)
class Concat:
    """Several tensors -> one, along ``dim`` (``q``, ``k``, ``v`` -> fused ``qkv``); inverse: split.

    Example:
        >>> Concat(0).bind([torch.empty(4, 2, device="meta"), torch.empty(2, 2, device="meta")]).inverse()
        Split(dim=0, sizes=(4, 2), parts=None)
    """

    dim: int = 0
    sizes: tuple[int, ...] | None = None
    name: ClassVar[str] = "concat"

    def __post_init__(self) -> None:
        _int(self.dim, "concat dim")
        if self.sizes is not None:
            object.__setattr__(self, "sizes", _ints(self.sizes, "concat sizes"))

    lossy: ClassVar[bool] = False

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.sizes is not None:
            got = tuple(t.shape[self.dim] if t.dim() > self.dim else -1 for t in tensors)
            if got != self.sizes:
                raise ValueError(f"concat expects sizes {list(self.sizes)} along dim {self.dim}, got {list(got)}")
        if tensors and all(t.device.type == "meta" for t in tensors):
            return [_meta_cat(tensors, self.dim)]
        return [torch.cat(list(tensors), dim=self.dim)]

    def inverse(self) -> Split:
        return Split(self.dim, self.sizes)

    def out_count(self, n_in: int) -> int:
        return 1

    def fit(self, n_in: int, n_out: int) -> Transform:
        if n_out != 1 or n_in < 2:
            raise TransformSpecError(f"concat joins several a keys into one b key, but the rule has {n_in} "
                                     f"a key(s) and {n_out} b key(s)",
                                     "list the parts under a and the fused key under b")
        if self.sizes is not None and len(self.sizes) != n_in:
            raise TransformSpecError(f"concat has {len(self.sizes)} sizes for {n_in} a keys",
                                     "give one size per a key, or none")
        return self

    def bind(self, inputs: Sequence[torch.Tensor]) -> Concat:
        if self.sizes is not None or any(t.dim() <= self.dim for t in inputs):
            return self
        return replace(self, sizes=tuple(int(t.shape[self.dim]) for t in inputs))

    def describe(self) -> str:
        return f"concat along dim {self.dim}" + (f" (sizes {list(self.sizes)})" if self.sizes else "")

    def to_dict(self) -> dict[str, Any]:
        args: dict[str, Any] = {"dim": self.dim}
        if self.sizes is not None:
            args["sizes"] = list(self.sizes)
        return {"concat": args}


@dataclass(frozen=True)
class Split:
    """One tensor -> several along ``dim``: explicit ``sizes`` or ``parts`` equal parts.

    Without either, it splits into as many equal parts as its rule has b keys.

    Example:
        >>> [t.shape[0] for t in Split(0, (4, 2)).apply([torch.zeros(6, 3)])]
        [4, 2]
    """

    dim: int = 0
    sizes: tuple[int, ...] | None = None
    parts: int | None = None
    name: ClassVar[str] = "split"

    def __post_init__(self) -> None:
        _int(self.dim, "split dim")
        if self.sizes is not None:
            sizes = _ints(self.sizes, "split sizes")
            if any(s < 0 for s in sizes):
                raise TransformSpecError(f"split sizes {list(sizes)} has a negative size", "use sizes >= 0")
            object.__setattr__(self, "sizes", sizes)
        if self.parts is not None and _int(self.parts, "split parts") < 1:
            raise TransformSpecError(f"split parts {self.parts} is not positive", "give parts >= 1")
        if self.sizes is not None and self.parts is not None and len(self.sizes) != self.parts:
            raise TransformSpecError(f"split has {len(self.sizes)} sizes but parts={self.parts}",
                                     "give sizes or parts, not both")

    lossy: ClassVar[bool] = False

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != 1:
            raise ValueError(f"split takes one tensor, got {len(tensors)}")
        t = tensors[0]
        if t.dim() <= self.dim:
            raise ValueError(f"split along dim {self.dim} needs at least {self.dim + 1} dims, "
                             f"got shape {list(t.shape)}")
        size = t.shape[self.dim]
        if self.sizes is not None:
            if sum(self.sizes) != size:
                raise ValueError(f"split sizes {list(self.sizes)} add up to {sum(self.sizes)}, "
                                 f"but dim {self.dim} has {size}")
            return list(torch.split(t, list(self.sizes), dim=self.dim))
        parts = self.parts or 1
        if size % parts:
            raise ValueError(f"dim {self.dim} of size {size} does not split into {parts} equal parts")
        return list(torch.split(t, size // parts, dim=self.dim))

    def inverse(self) -> Concat:
        return Concat(self.dim, self.sizes)

    def out_count(self, n_in: int) -> int | None:
        return len(self.sizes) if self.sizes is not None else self.parts

    def fit(self, n_in: int, n_out: int) -> Transform:
        if n_in != 1 or n_out < 2:
            raise TransformSpecError(f"split turns one a key into several b keys, but the rule has {n_in} "
                                     f"a key(s) and {n_out} b key(s)",
                                     "list the fused key under a and the parts under b")
        count = self.out_count(1)
        if count is None:
            return replace(self, parts=n_out)
        if count != n_out:
            raise TransformSpecError(f"split makes {count} parts but the rule has {n_out} b keys",
                                     "give one size per b key")
        return self

    def bind(self, inputs: Sequence[torch.Tensor]) -> Split:
        return self

    def describe(self) -> str:
        how = (f"sizes {list(self.sizes)}" if self.sizes is not None
               else f"{self.parts} equal parts" if self.parts else "equal parts")
        return f"split along dim {self.dim} into {how}"

    def to_dict(self) -> dict[str, Any]:
        args: dict[str, Any] = {"dim": self.dim}
        if self.sizes is not None:
            args["sizes"] = list(self.sizes)
        elif self.parts is not None:
            args["parts"] = self.parts
        return {"split": args}


@dataclass(frozen=True)
class Chain:
    """Several transforms, applied in order; inverse: their inverses in reverse order.

    Example:
        >>> from tensorparity.mapping import Transpose
        >>> Chain((Concat(0), Transpose(0, 1))).inverse().describe()
        'transpose dims 0 and 1, then split along dim 0 into equal parts'
    """

    steps: tuple[Transform, ...]
    name: ClassVar[str] = "chain"

    def __post_init__(self) -> None:
        if not self.steps:
            raise TransformSpecError("chain has no steps", "list at least one transform")
        object.__setattr__(self, "steps", tuple(self.steps))

    @property
    def lossy(self) -> bool:
        return any(s.lossy for s in self.steps)

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = list(tensors)
        for step in self.steps:
            out = step.apply(out)
        return out

    def inverse(self) -> Chain:
        return Chain(tuple(s.inverse() for s in reversed(self.steps)))

    def out_count(self, n_in: int) -> int | None:
        n: int | None = n_in
        for step in self.steps:
            if n is None:
                return None
            n = step.out_count(n)
        return n

    def fit(self, n_in: int, n_out: int) -> Transform:
        fitted, n = [], n_in
        for i, step in enumerate(self.steps):
            last = i == len(self.steps) - 1
            m = n_out if last else step.out_count(n)
            if m is None:
                raise TransformSpecError(f"step {i + 1} of the chain ({step.name}) has no part count",
                                         "give the split its sizes or parts")
            fitted.append(step.fit(n, m))
            n = m
        return Chain(tuple(fitted))

    def bind(self, inputs: Sequence[torch.Tensor]) -> Chain:
        bound, current = [], list(inputs)
        for step in self.steps:
            b = step.bind(current)
            bound.append(b)
            current = b.apply(current)
        return Chain(tuple(bound))

    def describe(self) -> str:
        return ", then ".join(s.describe() for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"chain": [s.to_dict() for s in self.steps]}
