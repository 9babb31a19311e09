"""Tolerances as a record: atol/rtol with dtype-aware defaults, per-key overrides, exact mode,
NaN equality and the error statistic judged."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from tensorparity._dtypes import dtype_name
from tensorparity.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["ResolvedTolerance", "Statistic", "Tolerance", "default_tolerance"]

Statistic = Literal["elementwise", "max", "mean"]
_STATISTICS = ("elementwise", "max", "mean")

# torch.testing.assert_close's defaults (rtol, atol) per dtype, by dtype name.
_DEFAULTS: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
    "complex32": (1e-3, 1e-5),
    "complex64": (1.3e-6, 1e-5),
    "complex128": (1e-7, 1e-7),
    # fp8 formats: a step of the mantissa (3 or 2 bits), as the looser of the pair decides anyway.
    "float8_e4m3fn": (0.125, 1e-3),
    "float8_e5m2": (0.25, 1e-3),
    "float8_e4m3fnuz": (0.125, 1e-3),
    "float8_e5m2fnuz": (0.25, 1e-3),
}


def default_tolerance(*dtypes: torch.dtype | str) -> tuple[float, float]:
    """``(rtol, atol)`` as ``torch.testing.assert_close`` picks them: the loosest of the dtypes.

    Integers and bools compare exactly.

    Example:
        >>> import torch
        >>> default_tolerance(torch.float32, torch.bfloat16)
        (0.016, 1e-05)
    """
    pairs = [_DEFAULTS.get(dtype_name(d), (0.0, 0.0)) for d in dtypes]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


@dataclass(frozen=True)
class ResolvedTolerance:
    """The tolerance applied to one tensor, after defaults and overrides."""

    atol: float
    rtol: float
    exact: bool = False
    equal_nan: bool = True
    statistic: Statistic = "elementwise"
    source: str = "default"
    ulps: float = 0.0

    def describe(self) -> str:
        if self.exact:
            return "exact (bitwise)"
        nan = "" if self.equal_nan else ", NaN != NaN"
        stat = "" if self.statistic == "elementwise" else f", {self.statistic} error"
        ulps = f", atol >= {self.ulps:.3g} ulp of max|b|" if self.ulps else ""
        return f"atol={self.atol:g}, rtol={self.rtol:g}{ulps}{stat}{nan}"


@dataclass(frozen=True)
class Tolerance:
    """How close is close enough.

    ``atol``/``rtol`` left as ``None`` take ``torch.testing.assert_close``'s defaults for the
    dtypes compared. A pair passes when ``|a - b| <= atol + rtol * |b|`` holds for every element
    (``statistic="elementwise"``), for the largest error (``"max"``: ``max|a-b| <= atol + rtol *
    max|b|``) or on average (``"mean"``). ``exact`` demands identical bytes. ``overrides`` are
    ``(regex, Tolerance)`` pairs; the first regex that matches a key (``re.search``) wins.

    ``ulps`` raises atol to at least ``ulps`` units in the last place of the compared dtype at
    the tensor's own scale (``ulps · eps · max|b|``): summation-order noise is relative to the
    largest magnitude a sum builds, not to each element (an element near zero in a large
    gradient carries the noise of the large ones). Layer parity sets it by default (see
    :func:`tensorparity.trace._compare.float_tolerance`); ``None`` or 0 leaves atol as it is.

    Example:
        >>> import torch
        >>> tol = Tolerance(atol=1e-4, overrides=((r"\\.norm", Tolerance(atol=1e-2)),))
        >>> tol.for_key("layers.0.norm.weight", torch.float32).atol
        0.01
    """

    atol: float | None = None
    rtol: float | None = None
    exact: bool = False
    equal_nan: bool = True
    statistic: Statistic = "elementwise"
    overrides: tuple[tuple[str, Tolerance], ...] = field(default=())
    ulps: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("atol", "rtol", "ulps"):
            value = getattr(self, name)
            if value is not None and not (value >= 0):
                problems.append(f"{name}={value} must be a number >= 0")
        if self.statistic not in _STATISTICS:
            problems.append(f"statistic {self.statistic!r} is not one of {', '.join(_STATISTICS)}")
        for pattern, _ in self.overrides:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"override pattern {pattern!r} does not compile ({exc})")
        if problems:
            raise UsageError("invalid tolerance: " + "; ".join(problems),
                             fix="use non-negative atol/rtol, a known statistic and valid regexes")

    def for_key(self, key: str, dtype_a: torch.dtype | str,
                dtype_b: torch.dtype | str | None = None) -> ResolvedTolerance:
        """The tolerance for one key and its dtypes (``torch.dtype`` or names)."""
        chosen, source = self, "default"
        for pattern, override in self.overrides:
            if re.search(pattern, key):
                chosen = _merge(self, override)
                source = f"override {pattern!r}"
                break
        rtol, atol = default_tolerance(dtype_a, dtype_b or dtype_a)
        if chosen.atol is not None or chosen.rtol is not None:
            source = source if source != "default" else "given"
        return ResolvedTolerance(
            atol=chosen.atol if chosen.atol is not None else atol,
            rtol=chosen.rtol if chosen.rtol is not None else rtol,
            exact=chosen.exact,
            equal_nan=chosen.equal_nan,
            statistic=chosen.statistic,
            source=source,
            ulps=float(chosen.ulps or 0.0) if not chosen.exact else 0.0,
        )

    def describe(self) -> str:
        if self.exact:
            text = "exact (bitwise)"
        else:
            atol = "dtype default" if self.atol is None else f"{self.atol:g}"
            rtol = "dtype default" if self.rtol is None else f"{self.rtol:g}"
            text = f"atol={atol}, rtol={rtol}, statistic={self.statistic}"
            if self.ulps:
                text += f", atol >= {self.ulps:.3g} ulp of max|b|"
            if not self.equal_nan:
                text += ", NaN != NaN"
        if self.overrides:
            text += f", {len(self.overrides)} per-key override(s)"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "atol": self.atol, "rtol": self.rtol, "exact": self.exact, "equal_nan": self.equal_nan,
            "statistic": self.statistic, "ulps": self.ulps,
            "overrides": [{"pattern": p, **t.to_dict()} for p, t in self.overrides],
        }


def _merge(base: Tolerance, override: Tolerance) -> Tolerance:
    """An override replaces only what it sets; exact/equal_nan/statistic come from it."""
    return replace(
        override,
        atol=override.atol if override.atol is not None else base.atol,
        rtol=override.rtol if override.rtol is not None else base.rtol,
        ulps=override.ulps if override.ulps is not None else base.ulps,
        overrides=(),
    )
