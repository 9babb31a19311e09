"""The record :func:`tensorparity.trace._replay.replay` returns: every replayed layer, the skipped
ones, the culprits, and its renderings (rich, JSON schema ``tensorparity.trace-replay/1``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partialmethod
from typing import TYPE_CHECKING, Any

from tensorparity.mapping import Mapping
from tensorparity.numerics import TensorComparison, Tolerance
from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import jsonable, printable, rich_titled_table, wrapped

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["SCHEMA", "ReplayReport", "ReplayedLayer", "SkippedLayer"]


SCHEMA = "tensorparity.trace-replay/1"


@dataclass(frozen=True)
class ReplayedLayer:
    """One reference layer replayed on its partner module.

    Attributes:
        layer: the reference layer (``module`` or ``module#call``); ``module``: the model's module.
        module_type: the model's module class; ``order``: the reference's execution position.
        outputs: each recorded output compared with what the module returned on the recorded inputs.
        contains: mismatched layers inside this one (their error explains this one's).
        error: what the module raised when called on the recorded inputs (a mismatch).
        adapted: how the recorded call was adapted to the module's signature (``None``: as recorded).
        layout: how the reference's tensors were transformed into the model's layout (derived
            from the mapping rule that transforms the module's weights; a fused module is
            replayed against its parts concatenated); ``None``: as they are.
        reordered: what it returned holds the reference's values in another order along its
            features (another layout, not another computation): no mismatch.
    """

    layer: str
    module: str
    module_type: str
    order: int
    outputs: tuple[TensorComparison, ...] = ()
    contains: tuple[str, ...] = ()
    error: str | None = None
    adapted: str | None = None
    layout: str | None = None
    reordered: bool = False

    @property
    def passed(self) -> bool:
        return self.error is None and (self.reordered or all(t.passed for t in self.outputs))

    @property
    def own_error(self) -> bool:
        """Mismatched and not explained by a mismatched child: this layer computes something else."""
        return not self.passed and not self.contains

    @property
    def max_abs(self) -> float:
        return max((t.max_abs for t in self.outputs), default=0.0)

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.layer} -> {self.module or '<model>'}: raised {self.error}"
        worst = max(self.outputs, key=lambda t: (not t.passed, t.max_abs), default=None)
        verdict = "same values, reordered (another layout)" if self.reordered else "matches" if self.passed else "differs"
        text = f"{self.layer} -> {self.module or '<model>'}: " + verdict
        if worst is not None:
            text += f", max abs {worst.max_abs:.3g} ({worst.tolerance.describe()}, {worst.tolerance.source})"
        if self.contains:
            text += f"; explained by {', '.join(self.contains)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "module": self.module, "module_type": self.module_type, "order": self.order,
                "passed": self.passed, "own_error": self.own_error, "contains": list(self.contains),
                "error": self.error, "adapted": self.adapted, "layout": self.layout, "reordered": self.reordered,
                "max_abs": self.max_abs, "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class SkippedLayer:
    """A reference layer that could not be replayed, and why."""

    layer: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "reason": self.reason}


@dataclass(frozen=True)
class ReplayReport:
    """What :func:`replay` found: every replayed layer in execution order, the skipped ones.

    ``culprits`` are the mismatched layers with no mismatched layer inside them, leaf-most first
    (execution order puts a child's output before its parent's).
    """

    reference: str
    model_class: str
    tolerance: Tolerance
    layers: tuple[ReplayedLayer, ...]
    skipped: tuple[SkippedLayer, ...] = ()
    notes: tuple[str, ...] = field(default=())
    found_mapping: Mapping | None = None

    @property
    def mismatched(self) -> tuple[ReplayedLayer, ...]:
        return tuple(x for x in self.layers if not x.passed)

    @property
    def culprits(self) -> tuple[ReplayedLayer, ...]:
        return tuple(x for x in self.layers if x.own_error)

    @property
    def verdict(self) -> str:
        if not self.layers:
            return "nothing replayed"
        if self.mismatched:
            return "differs"
        return "identical" if all(t.status == "identical" for x in self.layers for t in x.outputs) else "close"

    @property
    def exit_code(self) -> int:
        return 1 if self.verdict in ("differs", "nothing replayed") else 0

    def summary(self) -> str:
        text = (f"replay of {self.reference} on {self.model_class}: {self.verdict}; {len(self.layers)} layers "
                f"replayed, {len(self.mismatched)} differ, {len(self.skipped)} skipped")
        if self.culprits:
            text += "; own error in " + ", ".join(x.layer for x in self.culprits)
        return text

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"schema": SCHEMA, "reference": self.reference, "model_class": self.model_class,
                         "verdict": self.verdict, "tolerance": self.tolerance.describe(),
                         "culprits": [x.layer for x in self.culprits],
                         "layers": [x.to_dict() for x in self.layers],
                         "skipped": [x.to_dict() for x in self.skipped], "notes": list(self.notes),
                         "found_mapping": self.found_mapping.to_dict() if self.found_mapping is not None else None})

    to_json = partialmethod(report_json, ensure_ascii=True)  # \u escapes: what replay --json has always printed

    def renderable(self, *, top: int = 10) -> RenderableType:
        from rich.console import Group
        from rich.text import Text

        rows = []
        for x in self.layers:
            verdict = "match" if x.passed else ("OWN ERROR" if x.own_error else "differs (contains "
                                                + ", ".join(x.contains[:3]) + ")")
            if x.reordered:
                verdict = "layout only (reordered)"
            elif x.layout and x.passed:
                verdict = "match (through the layout)"
            if x.error is not None:
                verdict = "raised: " + " ".join(x.error.split())
            tol = x.outputs[0].tolerance.describe() if x.outputs else ""
            rows.append([printable(x.layer), printable(x.module or "<model>"), printable(verdict), f"{x.max_abs:.3g}",
                         tol])
        parts: list[Any] = [wrapped(self.summary())]
        for x in self.culprits:
            parts.append(wrapped("own error: " + printable(x.describe())))
        parts += rich_titled_table("Layers replayed on the reference's inputs (execution order)",
                                   ["reference layer", "module", "verdict", "max abs", "tolerance"], rows,
                                   left=("reference layer", "module", "verdict", "tolerance"))
        if self.skipped:
            shown = self.skipped[:top]
            rest = f" (and {len(self.skipped) - len(shown)} more)" if len(self.skipped) > len(shown) else ""
            parts.append(wrapped("skipped: " + "; ".join(f"{printable(s.layer)}: {printable(s.reason)}"
                                                         for s in shown) + rest))
        laid = [x for x in self.layers if x.layout]
        if laid:
            parts.append(wrapped("compared through a layout derived from the mapping: "
                                 + "; ".join(f"{printable(x.layer)}: {x.layout}" for x in laid[:top])
                                 + (f" (and {len(laid) - top} more)" if len(laid) > top else "")))
        parts += [Text("note: " + n) for n in self.notes]
        return Group(*parts)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, width=100)
