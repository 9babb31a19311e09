"""Result records of comparisons: what was compared, whether it passed, and by how much."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from tensorparity.numerics.tolerance import ResolvedTolerance

__all__ = ["Status", "TensorComparison"]

# identical: same bytes; close: within tolerance; mismatch: values outside tolerance;
# shape: shapes differ (never broadcast); missing: the entry could not be loaded on one side.
Status = Literal["identical", "close", "mismatch", "shape"]


@dataclass(frozen=True)
class TensorComparison:
    """One tensor pair compared.

    Attributes:
        key: the key (in A's key space); ``key_b`` when B's differs (through a mapping).
        passed: within tolerance (or identical).
        status: ``identical`` / ``close`` / ``mismatch`` / ``shape``.
        max_abs, max_rel, mean_abs: error statistics over finite elements.
        cosine: cosine similarity of the flattened tensors (1.0 for two zero tensors).
        n_mismatch, frac_mismatch: elements outside the tolerance (NaN/Inf disagreements count).
        nan_a, nan_b, inf_a, inf_b: counts; ``nan_agree``/``inf_agree``: same positions.
        first_index, first_a, first_b: the first offending element and both values.
        required_atol: the smallest atol that passes with this rtol; ``required_rtol`` likewise.
        tolerance: the tolerance applied.
    """

    key: str
    passed: bool
    status: Status
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    tolerance: ResolvedTolerance
    key_b: str | None = None
    numel: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    cosine: float = 1.0
    n_mismatch: int = 0
    frac_mismatch: float = 0.0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    nan_agree: bool = True
    inf_agree: bool = True
    first_index: tuple[int, ...] | None = None
    first_a: float | complex | None = None
    first_b: float | complex | None = None
    required_atol: float = 0.0
    required_rtol: float = 0.0

    @property
    def dtype_differs(self) -> bool:
        return self.dtype_a != self.dtype_b

    def summary(self) -> str:
        """One line for humans.

        Example:
            >>> from tensorparity.numerics import compare_tensors
            >>> import torch
            >>> compare_tensors("w", torch.ones(3), torch.ones(3)).summary()
            'w: identical'
        """
        if self.status == "identical":
            return f"{self.key}: identical"
        if self.status == "shape":
            return f"{self.key}: shape {list(self.shape_a)} vs {list(self.shape_b)}"
        text = (f"{self.key}: {self.status}, max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
                f"{self.n_mismatch}/{self.numel} outside ({self.tolerance.describe()})")
        if self.first_index is not None:
            text += f", first at {list(self.first_index)}: {self.first_a!r} vs {self.first_b!r}"
        return text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape_a"], data["shape_b"] = list(self.shape_a), list(self.shape_b)
        data["first_index"] = list(self.first_index) if self.first_index is not None else None
        for k in ("first_a", "first_b"):
            if isinstance(data[k], complex):
                data[k] = [data[k].real, data[k].imag]
        for k in ("max_abs", "max_rel", "mean_abs", "cosine", "required_atol", "required_rtol", "frac_mismatch"):
            data[k] = _json_float(data[k])
        data["first_a"], data["first_b"] = _json_float(data["first_a"]), _json_float(data["first_b"])
        return data


def _json_float(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value
