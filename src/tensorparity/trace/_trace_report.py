"""The record :func:`tensorparity.trace.compare_traces` returns, and its renderings: rich
(terminal) and JSON (schema ``tensorparity.trace-compare/1``).

A :class:`TraceReport` holds one :class:`LayerComparison` per aligned layer (forward outputs,
recorded inputs, gradients w.r.t. output and input, parameter gradients), the layers only one
side has, and the verdict. It leads with the first diverging layer in execution order (forward
first; when every forward output matches, the first backward divergence) and says for every
mismatched layer whether it *introduced* the error or *inherited* it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tensorparity.numerics import TensorComparison, Tolerance
from tensorparity.report import Unbroken, render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import jsonable, plural, printable, record_dict
from tensorparity.trace._trace_report_html import render_trace_html
from tensorparity.trace._trace_report_rich import rich_parts

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["SCHEMA", "LayerComparison", "TraceReport", "TraceSide", "UnalignedLayer", "Verdict"]

SCHEMA = "tensorparity.trace-compare/1"
Verdict = Literal["identical", "close", "differs", "inputs differ", "nothing compared"]
Origin = Literal["introduced", "inherited"]


def kind_of(t: TensorComparison) -> str:
    """The record kind of a comparison (its key is ``module/call/kind[/path]``)."""
    parts = t.key.split("/")
    return parts[2] if len(parts) > 2 else ""


@dataclass(frozen=True)
class TraceSide:
    """One trace as compared: where it came from, its mode, its size, what it says about itself."""

    source: str
    mode: str
    records: int
    layers: int
    model_class: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class UnalignedLayer:
    """A layer of one side without a partner on the other, and why."""

    layer: str
    module_type: str
    shape: tuple[int, ...] | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class LayerComparison:
    """One layer of A and its partner in B, compared.

    Attributes:
        layer_a, layer_b: the layers' names (``module`` or ``module#call``).
        type_a, type_b: their module classes.
        how: how they were paired: ``name``, ``mapping``, ``order`` or ``model`` (the whole models).
        order: A's forward execution position; ``backward_order``: A's first gradient record.
        shape: A's first output's shape.
        forward: the forward outputs compared; ``inputs``: recorded inputs compared.
        backward: gradients w.r.t. output and input, and parameter gradients, compared.
        basis: ``tensors`` or ``stats`` (statistics only: a side stored no tensors), or ``mixed``;
            ``by_stats``: the keys of the comparisons made by statistics.
        error, input_error: relative error (max abs error over the tensor's largest magnitude)
            of its outputs, and of what it received (see :mod:`tensorparity.trace.compare`).
        backward_error, backward_input_error: the same for its gradients (w.r.t. input and
            parameters; w.r.t. output).
        origin: for a mismatched layer, ``introduced`` or ``inherited``; ``inherited_from`` names
            the layer that introduced what it inherited (``<model input>`` when the inputs differ).
        layout: how A's activations were transformed into B's layout before comparing (derived
            from the mapping rule that transforms the layer's weights), ``None`` when as they are;
            ``layout_notes``: what of it could not be applied, and why.
        healed_at: for a layer that differs while the ancestor it runs in matches again (a
            re-parametrisation, not a bug), that ancestor (``None`` where the tensors that differ
            are known to hold the same values in another order, though the ancestor differs for
            another reason); ``healed_directions``: in which directions (``forward``,
            ``backward``) it differs in layout only: those are no mismatch.
    """

    layer_a: str
    layer_b: str
    type_a: str
    type_b: str
    how: str
    order: int
    backward_order: int | None
    shape: tuple[int, ...] | None
    forward: tuple[TensorComparison, ...] = ()
    inputs: tuple[TensorComparison, ...] = ()
    backward: tuple[TensorComparison, ...] = ()
    basis: str = "tensors"
    by_stats: tuple[str, ...] = ()
    error: float = 0.0
    input_error: float = 0.0
    backward_error: float = 0.0
    backward_input_error: float | None = None
    origin: Origin | None = None
    inherited_from: str | None = None
    layout: str | None = None
    layout_notes: tuple[str, ...] = ()
    healed_at: str | None = None
    healed_directions: tuple[str, ...] = ()

    @property
    def healed(self) -> bool:
        """It differs in layout only: what it passes on matches again at :attr:`healed_at`, or its
        differing tensors hold the same values in another order."""
        return bool(self.healed_directions)

    @property
    def healed_how(self) -> str:
        """``healed at attn``, or ``same values, reordered``."""
        return f"healed at {self.healed_at}" if self.healed_at else "same values, reordered"

    @property
    def forward_mismatch(self) -> bool:
        """Its forward differs, and not in layout only."""
        return self.forward_passed is False and "forward" not in self.healed_directions

    @property
    def backward_mismatch(self) -> bool:
        """Its gradients differ, and not in layout only."""
        return self.backward_passed is False and "backward" not in self.healed_directions

    def counted(self) -> tuple[TensorComparison, ...]:
        """The comparisons its verdict rests on: all but those of a direction that healed
        (parameter gradients always count)."""
        out = [] if "forward" in self.healed_directions else list(self.forward + self.inputs)
        back = "backward" in self.healed_directions
        return tuple(out + [t for t in self.backward if not back or kind_of(t) == "param_grad"])

    @property
    def forward_passed(self) -> bool | None:
        """Whether every forward output (and recorded input) is within tolerance; ``None``: none compared."""
        both = self.forward + self.inputs
        return all(t.passed for t in both) if both else None

    @property
    def backward_passed(self) -> bool | None:
        return all(t.passed for t in self.backward) if self.backward else None

    @property
    def passed(self) -> bool:
        return self.forward_passed is not False and self.backward_passed is not False

    @property
    def direction(self) -> str | None:
        """``forward`` or ``backward``: where this layer first differs (``None`` when it matches)."""
        if self.forward_mismatch:
            return "forward"
        return "backward" if self.backward_mismatch else None

    @property
    def max_abs(self) -> float:
        """The largest absolute error among its forward outputs (its gradients when no output differs)."""
        fwd = [t.max_abs for t in self.forward + self.inputs]
        if fwd and (max(fwd) > 0 or not self.backward):
            return max(fwd)
        return max((t.max_abs for t in self.backward), default=0.0)

    @property
    def worst(self) -> TensorComparison | None:
        """The comparison that decides the layer's verdict: its worst failing one (forward first)."""
        for group in (self.forward + self.inputs, self.backward):
            bad = [t for t in group if not t.passed]
            if bad:
                return max(bad, key=lambda t: (t.status == "shape", t.frac_mismatch, t.max_abs))
        return None

    @property
    def label(self) -> str:
        """``layers.1.norm1 → blocks.1.attn_norm`` (one name when both sides call it the same)."""
        return printable(self.layer_a if self.layer_a == self.layer_b else f"{self.layer_a} → {self.layer_b}")

    def to_dict(self) -> dict[str, Any]:
        d = record_dict(self)
        for name in ("forward", "inputs", "backward"):
            d[name] = [{"kind": kind_of(t), "basis": "stats" if t.key in self.by_stats else "tensors", **t.to_dict()}
                       for t in getattr(self, name)]
        d.update(forward_passed=self.forward_passed, backward_passed=self.backward_passed, passed=self.passed,
                 direction=self.direction, max_abs=self.max_abs)
        return d


@dataclass(frozen=True)
class TraceReport:
    """Two traces compared layer by layer: what :func:`tensorparity.trace.compare_traces` returns.

    Attributes:
        a, b: the two traces.
        tolerance: the tolerance asked for (each comparison records the one it resolved to).
        alignment: how layers were paired (``name``, ``mapping`` or ``order``); ``mapping``: the
            mapping's source, when one was used.
        layers: every aligned layer, in A's forward execution order.
        only_a, only_b: layers without a partner.
        params: every parameter gradient compared (also listed under their layers when both
            owners are an aligned pair); ``params_only_a`` / ``params_only_b``: those without one.
        margin: a layer *introduced* its error when its relative error exceeds its input's by
            this factor.
        inputs_differ: the two runs were fed different inputs (every layer will differ).
        found_mapping: the :class:`~tensorparity.mapping.Mapping` compare found from the traces'
            parameters when none was given (``mapping`` then says so); ``None`` otherwise.
        warnings: what makes the verdict doubtful; ``notes``: what the reader should know.
    """

    a: TraceSide
    b: TraceSide
    tolerance: Tolerance
    alignment: str
    layers: tuple[LayerComparison, ...]
    only_a: tuple[UnalignedLayer, ...] = ()
    only_b: tuple[UnalignedLayer, ...] = ()
    params: tuple[TensorComparison, ...] = ()
    params_only_a: tuple[str, ...] = ()
    params_only_b: tuple[str, ...] = ()
    mapping: str | None = None
    margin: float = 10.0
    inputs_differ: bool = False
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    found_mapping: Any = None

    # Counts
    @property
    def mismatched(self) -> tuple[LayerComparison, ...]:
        """Mismatched layers in execution order: forward mismatches first, then backward-only ones
        in backward order."""
        fwd = [x for x in self.layers if x.forward_mismatch]
        bwd = [x for x in self.layers if not x.forward_mismatch and x.backward_mismatch]
        return tuple(fwd + sorted(bwd, key=lambda x: (x.backward_order is None, x.backward_order or 0)))

    @property
    def healed(self) -> tuple[LayerComparison, ...]:
        """Layers that differ in layout only: their ancestor matches again (see ``healed_at``)."""
        return tuple(x for x in self.layers if x.healed)

    @property
    def matched(self) -> tuple[LayerComparison, ...]:
        return tuple(x for x in self.layers if x.passed)

    @property
    def first_divergence(self) -> LayerComparison | None:
        """The first layer, in execution order, whose outputs differ; when every output matches,
        the first (in backward order) whose gradients differ. When that layer inherited its error
        from its parent's own code (both sides recorded inputs), the parent is the divergence."""
        bad = self.mismatched
        if not bad:
            return None
        first = bad[0]
        if first.origin == "inherited" and first.inherited_from:
            parent = next((x for x in bad if x.layer_a == first.inherited_from and x.origin == "introduced"), None)
            if parent is not None and first.layer_a.startswith(parent.layer_a.replace("<model>", "")):
                return parent
        return first

    def _rate(self, direction: str) -> tuple[int, int]:
        verdicts = [getattr(x, f"{direction}_passed") for x in self.layers]
        return sum(v is True for v in verdicts), sum(v is not None for v in verdicts)

    @property
    def forward_rate(self) -> tuple[int, int]:
        """(layers whose forward matches, layers with a forward comparison)."""
        return self._rate("forward")

    @property
    def backward_rate(self) -> tuple[int, int]:
        return self._rate("backward")

    @property
    def params_rate(self) -> tuple[int, int]:
        return sum(t.passed for t in self.params), len(self.params)

    # Verdict
    @property
    def _comparisons(self) -> list[TensorComparison]:
        """Every comparison once (parameter gradients under a layer are also in ``params``); of a
        healed direction none (its activations differ in layout only)."""
        out = [t for x in self.layers for t in x.counted()]
        seen = {id(t) for t in out}
        return out + [t for t in self.params if id(t) not in seen]

    @property
    def verdict(self) -> Verdict:
        if self.inputs_differ:
            return "inputs differ"
        comps = self._comparisons
        if not comps:
            return "nothing compared"
        if not all(t.passed for t in comps):
            return "differs"
        return "identical" if all(t.status == "identical" for t in comps) else "close"

    @property
    def passed(self) -> bool:
        return self.verdict in ("identical", "close")

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 when the two runs are the same (identical or close), 1 otherwise."""
        return 0 if self.passed else 1

    def classic_summary(self) -> str:
        """The seeds' line: ``Common layers: 40 / Only in A: 2 / Only in B: 0 / Matched: 40 /
        Mismatched: 0 / Forward match rate: 100.0% / Backward match rate: 100.0% / Parameter
        gradients matched: 36/36 → identical``."""
        def rate(ok: int, n: int) -> str:
            return f"{100.0 * ok / n:.1f}%" if n else "n/a"

        healed = f"Healed: {len(self.healed)} / " if self.healed else ""
        return (f"Common layers: {len(self.layers)} / Only in A: {len(self.only_a)} / Only in B: {len(self.only_b)} / "
                f"Matched: {len(self.matched)} / Mismatched: {len(self.mismatched)} / {healed}"
                f"Forward match rate: {rate(*self.forward_rate)} / Backward match rate: {rate(*self.backward_rate)} / "
                f"Parameter gradients matched: {self.params_rate[0]}/{self.params_rate[1]} → {self.verdict}")

    def summary(self) -> str:
        """One line for humans: the verdict and the first divergence."""
        first = self.first_divergence
        if self.verdict == "inputs differ":
            return "inputs differ: the two runs were fed different inputs, so every layer is expected to differ"
        if self.verdict == "nothing compared":
            return "nothing compared: no layer of A could be paired with a layer of B"
        if first is None:
            same = sum(t.status == "identical" for t in self._comparisons)
            healed = (f"; {plural(len(self.healed), 'layer')} differ in layout only ("
                      f"{', '.join(sorted({printable(x.healed_how) for x in self.healed})[:3])})"
                      if self.healed else "")
            return (f"{self.verdict}: {plural(len(self.layers) - len(self.healed), 'layer')} match forward and "
                    f"backward ({same:,} of {plural(len(self._comparisons), 'tensor')} bitwise identical){healed}")
        return (f"differs: first divergence {first.direction} at {first.label} "
                f"({printable(first.type_a.rsplit('.', 1)[-1])}), "
                f"{first.origin or 'introduced'}; {plural(len(self.mismatched), 'mismatched layer')}")

    # Machines
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.trace-compare/1", ...}`` (strict JSON)."""
        first = self.first_divergence
        fwd, bwd, params = self.forward_rate, self.backward_rate, self.params_rate
        return jsonable({
            "schema": SCHEMA, "verdict": self.verdict, "passed": self.passed, "exit_code": self.exit_code,
            "summary": self.summary(), "classic_summary": self.classic_summary(),
            "a": self.a.to_dict(), "b": self.b.to_dict(),
            "alignment": {"method": self.alignment, "mapping": self.mapping,
                          "found_mapping": self.found_mapping.to_dict() if self.found_mapping is not None else None},
            "tolerance": {"description": self.tolerance.describe(), **self.tolerance.to_dict()},
            "margin": self.margin,
            "counts": {"common": len(self.layers), "only_in_a": len(self.only_a), "only_in_b": len(self.only_b),
                       "matched": len(self.matched), "mismatched": len(self.mismatched), "healed": len(self.healed),
                       "forward_matched": fwd[0], "forward_compared": fwd[1],
                       "backward_matched": bwd[0], "backward_compared": bwd[1],
                       "param_grads_matched": params[0], "param_grads_compared": params[1]},
            "first_divergence": None if first is None else {
                "layer_a": first.layer_a, "layer_b": first.layer_b, "direction": first.direction,
                "origin": first.origin, "error": first.error, "input_error": first.input_error},
            "layers": [x.to_dict() for x in self.layers],
            "only_in_a": [x.to_dict() for x in self.only_a], "only_in_b": [x.to_dict() for x in self.only_b],
            "parameter_gradients": [{"kind": "param_grad", **t.to_dict()} for t in self.params],
            "parameter_gradients_only_in_a": list(self.params_only_a),
            "parameter_gradients_only_in_b": list(self.params_only_b),
            "warnings": list(self.warnings), "notes": list(self.notes),
        })

    to_json = report_json

    # People
    def to_html(self) -> str:
        """The report as one self-contained HTML page (see :mod:`tensorparity.trace._trace_report_html`)."""
        return render_trace_html(self)

    def renderable(self, *, top: int = 10) -> RenderableType:
        """A rich renderable: summary first, the first divergence, mismatched layers, then the rest
        folded to ``top`` rows."""
        from rich.console import Group

        head, classic, body = rich_parts(self, top=top)
        return Group(*head, Unbroken(classic), *body)  # the classic line: printed whole, scripts grep for it

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = report_text

    def __repr__(self) -> str:
        return f"<TraceReport {self.a.source!r} vs {self.b.source!r}: {self.classic_summary()}>"
