"""Per-step fingerprints of a training run, and comparing two runs' fingerprints step by step.

A :class:`StepRecord` is what one step leaves behind: where its batch came from (epoch, index in
the epoch) and a hash of its bytes, the loss, the gradient norm and learning rate of the
optimizer step, and a hash of every tensor of the model's state after the step. Two runs agree
at a step when the batch hashes are equal, the losses and gradient norms pass the tolerance, and
(bitwise) every tensor hash is equal. Floats go through :func:`tensorparity.numerics.compare_tensors`
like every other comparison in tensorparity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tensorparity.checkpoint.tracefolder.stats import tensor_bytes
from tensorparity.numerics import Tolerance, compare_tensors
from tensorparity.resume._resume_report import StepRow

__all__ = ["StepRecord", "compare_records", "hash_batch", "hash_tensor", "state_hashes"]

_MAX_NAMED = 5


def hash_tensor(t: torch.Tensor) -> str:
    """A short hash of a tensor's dtype, shape and bytes (bitwise identity, not closeness).

    Example:
        >>> hash_tensor(torch.zeros(2)) == hash_tensor(torch.zeros(2)), hash_tensor(torch.zeros(2)) == hash_tensor(torch.zeros(3))
        (True, False)
    """
    h = hashlib.blake2b(digest_size=8)
    _feed(h, t)
    return h.hexdigest()


def _feed(h: Any, t: torch.Tensor) -> None:
    local = getattr(t, "to_local", None)  # a DTensor: this rank's shard
    t = (local() if callable(local) else t).detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(tensor_bytes(t))


def hash_batch(batch: Any) -> str:
    """A hash of a batch of any structure: tensors by their bytes, other leaves by ``repr``.

    Example:
        >>> hash_batch({"x": torch.ones(2), "ids": [1, 2]}) == hash_batch({"x": torch.ones(2), "ids": [1, 2]})
        True
    """
    h = hashlib.blake2b(digest_size=8)
    stack: list[Any] = [batch]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            _feed(h, item)
        elif isinstance(item, np.ndarray) and item.dtype != np.object_:
            _feed(h, torch.from_numpy(np.ascontiguousarray(item)))
        elif isinstance(item, Mapping):
            h.update(b"{")
            for k in sorted(item, key=repr):
                h.update(repr(k).encode())
                stack.append(item[k])
        elif isinstance(item, (list, tuple)):
            h.update(f"[{len(item)}".encode())
            stack.extend(reversed(item))
        else:
            h.update(repr(item).encode())
    return h.hexdigest()


def state_hashes(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """:func:`hash_tensor` of every tensor of a state dict."""
    return {k: hash_tensor(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class StepRecord:
    """One step's fingerprint.

    Attributes:
        step: the step number (1-based; micro-batches under gradient accumulation).
        epoch, batch: where the batch came from (0-based epoch, index in the epoch).
        batch_hash: hash of the batch's bytes.
        loss: the loss ``step`` returned; ``loss_dtype`` its dtype.
        grad_norm: the L2 norm of all gradients as the optimizer step saw them (or as they stand
            after the step when no optimizer step happened).
        lr: the learning rate of the first parameter group at the optimizer step.
        updated: whether the optimizer stepped.
        tensors: hash of every tensor of ``model.state_dict()`` after the step.
    """

    step: int
    epoch: int
    batch: int
    batch_hash: str
    loss: float | None
    loss_dtype: str = "float32"
    grad_norm: float | None = None
    lr: float | None = None
    updated: bool = False
    tensors: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "batch_hash": self.batch_hash,
                "loss": self.loss, "loss_dtype": self.loss_dtype, "grad_norm": self.grad_norm, "lr": self.lr,
                "updated": self.updated, "tensors": dict(self.tensors)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepRecord:
        return cls(int(d["step"]), int(d["epoch"]), int(d["batch"]), str(d["batch_hash"]), d["loss"],
                   str(d.get("loss_dtype", "float32")), d.get("grad_norm"), d.get("lr"), bool(d.get("updated")),
                   dict(d.get("tensors") or {}))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float64


def _same_float(what: str, a: float | None, b: float | None, dtype: torch.dtype, tol: Tolerance) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return compare_tensors(what, torch.tensor([a], dtype=dtype), torch.tensor([b], dtype=dtype), tol).passed


def compare_records(a: Sequence[StepRecord], b: Sequence[StepRecord], tolerance: Tolerance) -> tuple[StepRow, ...]:
    """Judge each of ``b``'s records against ``a``'s record of the same step.

    ``a`` is the uninterrupted run (all of it: a batch of ``b`` that differs is looked up among
    all of ``a``'s batches, to say which step it belongs to), ``b`` the resumed run.

    Parameters are judged by their hashes only when ``tolerance`` is exact; otherwise by the loss
    and gradient norm (the final states are compared with the tolerance elsewhere).

    Example:
        >>> r = StepRecord(1, 0, 0, "ab", 0.5, tensors={"w": "00"})
        >>> [row.match for row in compare_records([r], [r], Tolerance(exact=True))]
        [True]
    """
    by_step = {r.step: r for r in a}
    origin: dict[str, int] = {}
    for r in a:
        origin.setdefault(r.batch_hash, r.step)
    rows = []
    for rb in b:
        ra = by_step.get(rb.step)
        if ra is None:
            continue
        dtype = _dtype(ra.loss_dtype)
        differing = [k for k in ra.tensors if rb.tensors.get(k) != ra.tensors[k]]
        differing += [k for k in rb.tensors if k not in ra.tensors]
        batch_same = ra.batch_hash == rb.batch_hash
        rows.append(StepRow(
            step=ra.step, epoch=ra.epoch, batch=ra.batch, epoch_b=rb.epoch, batch_b=rb.batch,
            loss_a=ra.loss, loss_b=rb.loss, grad_a=ra.grad_norm, grad_b=rb.grad_norm, lr_a=ra.lr, lr_b=rb.lr,
            batch_same=batch_same,
            loss_same=_same_float(f"step {ra.step} loss", ra.loss, rb.loss, dtype, tolerance),
            grad_same=_same_float(f"step {ra.step} grad norm", ra.grad_norm, rb.grad_norm, torch.float32, tolerance),
            params_same=(not differing) if tolerance.exact else None,
            params_differing=tuple(differing[:_MAX_NAMED]) if tolerance.exact else (),
            n_params_differing=len(differing) if tolerance.exact else 0,
            n_params=len(ra.tensors), batch_b_from=None if batch_same else origin.get(rb.batch_hash)))
    return tuple(rows)
