"""The HTML rendering of a :class:`~tensorparity.trace._trace_report.TraceReport`: one self-contained
file that opens offline (no CDN, no external fonts or scripts).

It holds the verdict and the summary, an inline SVG plot of every layer's relative error along
A's execution order (forward and backward as two series, on a log scale, with the tolerance line
and the first divergence marked), and a table of the layers that a text box filters by name.
Every string that comes from a trace (layer names come from user models) is escaped; the page's
only script is the filter, which reads no trace data.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tensorparity.report._render import num, printable
from tensorparity.trace._trace_report_rich import _first_lines, _mark, _origin_cell, _rel

if TYPE_CHECKING:
    from tensorparity.numerics import TensorComparison
    from tensorparity.trace._trace_report import LayerComparison, TraceReport

__all__ = ["render_trace_html"]

_E = html.escape
# Plot geometry (SVG user units; the SVG scales to the page width).
_W, _H, _L, _R, _T, _B = 900, 320, 64, 16, 16, 56
_COLORS = {"forward": "#1f77b4", "backward": "#ff7f0e", "tolerance": "#2ca02c", "first": "#d62728"}

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
.ok{background:#2ca02c} .bad{background:#d62728} .warn{background:#b8860b}
.mono,td{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left}
th{background:#f4f4f4;position:sticky;top:0} tr.diff td{background:#fff3f3} tr.first td{background:#ffdede}
.pass{color:#2ca02c} .fail{color:#d62728;font-weight:600} .muted{color:#777}
input[type=search]{width:320px;padding:4px 8px;font-size:14px} svg{width:100%;height:auto;max-width:1100px}
.first{border-left:4px solid #d62728;padding:4px 12px;background:#fff6f6}
"""

# The filter: rows whose layer cell contains the text box's words (all of them, any case);
# "mismatched only" hides the rows that match. Plain DOM, no data from the trace.
_JS = """
(function () {
  var box = document.getElementById('filter'), only = document.getElementById('only-diff');
  var rows = document.querySelectorAll('#layers tbody tr'), count = document.getElementById('shown');
  function apply() {
    var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0;
    rows.forEach(function (tr) {
      var name = tr.getAttribute('data-name').toLowerCase();
      var ok = words.every(function (w) { return name.indexOf(w) >= 0; });
      if (only.checked && !tr.classList.contains('diff')) ok = false;
      tr.style.display = ok ? '' : 'none';
      if (ok) shown++;
    });
    count.textContent = shown + ' of ' + rows.length + ' layers shown';
  }
  box.addEventListener('input', apply);
  only.addEventListener('change', apply);
  apply();
})();
"""


def _relative_tolerance(comps: Sequence[TensorComparison], error: float) -> float | None:
    """The tolerance a group of comparisons allows, as a relative error at the tensor's largest magnitude.

    A comparison passes elementwise when ``|a - b| <= atol + rtol * |b|``; at B's largest magnitude
    ``M`` that is a relative error of ``atol / M + rtol``. ``M`` is recovered from the group's
    relative error and its largest absolute error (exact for a layer with one output, which is the
    common case). ``None`` when nothing differs (``M`` is then unknown).
    """
    if not comps or not (error > 0 and math.isfinite(error)):
        return None
    t = max(comps, key=lambda c: c.max_abs)
    atol, rtol = t.tolerance.atol, t.tolerance.rtol
    if t.max_abs <= 0 or not math.isfinite(t.max_abs) or atol is None or rtol is None:
        return None
    return atol * error / t.max_abs + rtol


def _tolerance_levels(report: TraceReport) -> list[float | None]:
    """Per layer, the relative tolerance of its forward outputs (of its gradients when the
    outputs tell none)."""
    out: list[float | None] = []
    for x in report.layers:
        level = _relative_tolerance(x.forward, x.error)
        out.append(level if level is not None else _relative_tolerance(x.backward, x.backward_error))
    return out


def _fallback_tolerance(report: TraceReport) -> float | None:
    """``atol + rtol`` of the first resolved tolerance: the relative error allowed at magnitude 1."""
    for x in report.layers:
        for t in x.forward + x.backward:
            if t.tolerance.atol is not None and t.tolerance.rtol is not None:
                return t.tolerance.atol + t.tolerance.rtol
    return None


def _plot(report: TraceReport) -> str:
    """The inline SVG: relative error per layer, forward and backward, log scale."""
    layers = report.layers
    n = len(layers)
    if n == 0:
        return '<p class="muted">No layer was aligned: nothing to plot.</p>'
    fwd = [x.error for x in layers]
    bwd = [x.backward_error if x.backward else None for x in layers]
    tol = _tolerance_levels(report)
    known = [v for v in tol if v is not None]
    if not known and (fb := _fallback_tolerance(report)) is not None:
        tol, known = [fb] * n, [fb]
    # Carry the nearest known tolerance over layers that tell none (identical ones).
    filled: list[float | None] = list(tol)
    last = next(iter(known), None)
    for i, v in enumerate(filled):
        last = v if v is not None else last
        filled[i] = last
    finite = [v for v in [*fwd, *(b for b in bwd if b is not None), *known] if v and math.isfinite(v)]
    lo = math.floor(math.log10(min(finite))) - 1 if finite else -8
    hi = math.ceil(math.log10(max(finite))) if finite else 0
    hi = max(hi, lo + 2)
    pw, ph = _W - _L - _R, _H - _T - _B

    def x_of(i: int) -> float:
        return _L + (pw * (i + 0.5) / n)

    def y_of(v: float) -> float:
        # 0 (bitwise identical) sits on the floor; inf (shape or NaN differences) at the top.
        e = lo if v <= 0 else hi if math.isinf(v) else min(max(math.log10(v), lo), hi)
        return _T + ph * (hi - e) / (hi - lo)

    parts = [f'<svg viewBox="0 0 {_W} {_H}" role="img" '
             f'aria-label="relative error per layer">',
             f'<rect x="{_L}" y="{_T}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for e in range(lo, hi + 1):
        y = y_of(10.0**e)
        label = "0" if e == lo else f"1e{e}"
        parts.append(f'<line x1="{_L}" x2="{_L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    first = report.first_divergence
    if first is not None:
        i = layers.index(first)
        parts.append(f'<line x1="{x_of(i):.1f}" x2="{x_of(i):.1f}" y1="{_T}" y2="{_T + ph}" '
                     f'stroke="{_COLORS["first"]}" stroke-dasharray="4 3"/>'
                     f'<text x="{x_of(i) + 4:.1f}" y="{_T + 12}" font-size="11" fill="{_COLORS["first"]}">'
                     f'first divergence: {_E(printable(first.layer_a))}</text>')
    if any(v is not None for v in filled):
        pts = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(filled) if v is not None)
        parts.append(f'<polyline class="series-tolerance" points="{pts}" fill="none" '
                     f'stroke="{_COLORS["tolerance"]}" stroke-dasharray="6 4"/>')
    for name, values in (("forward", fwd), ("backward", bwd)):
        pts_l = [(x_of(i), y_of(v), v, layers[i]) for i, v in enumerate(values) if v is not None]
        if not pts_l:
            continue
        pts = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in pts_l)
        parts.append(f'<polyline class="series-{name}" points="{pts}" fill="none" stroke="{_COLORS[name]}" '
                     f'stroke-width="1.5"/>')
        for px, py, v, x in pts_l:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{_COLORS[name]}"><title>'
                         f'{_E(x.label)}: {name} relative error {_E(_rel(v))}</title></circle>')
    step = max(1, math.ceil(n / 40))  # at most ~40 tick labels
    for i in range(0, n, step):
        parts.append(f'<text x="{x_of(i):.1f}" y="{_T + ph + 14}" font-size="10" text-anchor="middle">'
                     f'{layers[i].order}</text>')
    ly = _H - 14
    legend = [("forward", "forward output error"), ("backward", "gradient error"),
              ("tolerance", "tolerance (relative, at the largest magnitude)")]
    for k, (key, text) in enumerate(legend):
        lx = _L + k * 230
        dash = ' stroke-dasharray="6 4"' if key == "tolerance" else ""
        parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly - 4}" y2="{ly - 4}" stroke="{_COLORS[key]}" '
                     f'stroke-width="2"{dash}/><text x="{lx + 28}" y="{ly}" font-size="11">{text}</text>')
    parts.append(f'<text x="{_L + pw}" y="{_T + ph + 30}" font-size="11" text-anchor="end">layer, in A\'s forward '
                 f"execution order (relative error = max|a−b| / max|b|; 0 on the floor, ∞ at the top)</text>")
    parts.append("</svg>")
    return "".join(parts)


def _cell(passed: bool | None) -> str:
    css = "muted" if passed is None else "pass" if passed else "fail"
    return f'<td class="{css}">{_E(_mark(passed))}</td>'


def _row(x: LayerComparison, first: LayerComparison | None) -> str:
    css = " ".join(c for c in ("diff" if not x.passed else "", "first" if x is first else "") if c)
    types = printable(x.type_a.rsplit(".", 1)[-1])
    if x.type_b != x.type_a:
        types += " → " + printable(x.type_b.rsplit(".", 1)[-1])
    shape = str(list(x.shape)) if x.shape is not None else ""
    bwd = _rel(x.backward_error) if x.backward else "-"
    return (f'<tr class="{css}" data-name="{_E(x.layer_a + " " + x.layer_b)}"><td>{x.order}</td>'
            f"<td>{_E(x.label)}</td><td>{_E(types)}</td>{_cell(x.forward_passed)}{_cell(x.backward_passed)}"
            f"<td>{_E(num(x.max_abs))}</td><td>{_E(_rel(x.error))}</td><td>{_E(bwd)}</td><td>{_E(shape)}</td>"
            f"<td>{_E(_origin_cell(x, first))}</td><td>{_E(x.layout or '')}</td></tr>")


def _unaligned(report: TraceReport) -> str:
    out = []
    for side, items in (("A", report.only_a), ("B", report.only_b)):
        if items:
            lis = "".join(f"<li><span class=mono>{_E(printable(u.layer))}</span> "
                          f"({_E(printable(u.module_type.rsplit('.', 1)[-1]))}): {_E(u.reason)}</li>" for u in items)
            out.append(f"<h2>Only in {side} ({len(items)})</h2><ul>{lis}</ul>")
    return "".join(out)


def render_trace_html(report: TraceReport, *, title: str | None = None) -> str:
    """The report as one self-contained HTML page (no network needed to open it).

    Args:
        report: what :func:`tensorparity.trace.compare_traces` returned.
        title: the page title (default: ``tensorparity compare A vs B``).

    Returns:
        The HTML text; write it to a ``.html`` file or show it in a notebook.

    Example:
        >>> from tensorparity.trace._trace_report_html import render_trace_html
        >>> page = render_trace_html(report)  # doctest: +SKIP
        >>> Path("report.html").write_text(page, encoding="utf-8")  # doctest: +SKIP
    """
    first = report.first_divergence
    css = "ok" if report.passed else "warn" if report.verdict == "nothing compared" else "bad"
    title = title or f"tensorparity compare {report.a.source} vs {report.b.source}"
    first_html = ""
    if first is not None:
        lines = "".join(f"<div>{_E(line)}</div>" for line in _first_lines(report))
        first_html = f'<h2>First divergence</h2><div class="first">{lines}</div>'
    notes = "".join(f'<li class="fail">{_E(w)}</li>' for w in report.warnings)
    notes += "".join(f"<li>{_E(n)}</li>" for n in report.notes)
    sides = "".join(f"<tr><th>{k}</th><td>{_E(s.source)}</td><td>{_E(s.model_class or '')}</td><td>{_E(s.mode)}</td>"
                    f"<td>{s.records:,} records, {s.layers:,} layers</td></tr>"
                    for k, s in (("A", report.a), ("B", report.b)))
    alignment = report.alignment + (f" ({report.mapping})" if report.mapping else "")
    rows = "".join(_row(x, first) for x in report.layers)
    head = ("<tr><th>#</th><th>layer</th><th>type</th><th>fwd</th><th>bwd</th><th>max abs</th>"
            "<th>rel. error</th><th>grad rel. error</th><th>shape</th><th>origin</th>"
            "<th>layout (what was done to A's activations)</th></tr>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_E(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f'<h1>Layer parity <span class="verdict {css}">{_E(report.verdict)}</span></h1>'
        f"<p>{_E(report.summary())}</p><p class=mono>{_E(report.classic_summary())}</p>"
        f"<table>{sides}<tr><th>alignment</th><td colspan=4>{_E(alignment)}</td></tr>"
        f"<tr><th>tolerance</th><td colspan=4>{_E(report.tolerance.describe())}; introduced when a layer's "
        f"error exceeds its input's {_E(num(report.margin))}×</td></tr></table>"
        f"{f'<ul>{notes}</ul>' if notes else ''}{first_html}"
        f"<h2>Relative error per layer</h2>{_plot(report)}"
        f'<h2>Layers</h2><p><input type="search" id="filter" placeholder="filter layers by name" '
        f'aria-label="filter layers by name"> <label><input type="checkbox" id="only-diff"> mismatched only</label> '
        f'<span id="shown" class="muted"></span></p>'
        f'<table id="layers"><thead>{head}</thead><tbody>{rows}</tbody></table>'
        f"{_unaligned(report)}<script>{_JS}</script></body></html>\n"
    )
