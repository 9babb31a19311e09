"""No mapping given: find it from what the traces hold.

A trace captured in ``full`` mode stores every parameter (kind ``param``) or at least every
parameter gradient (kind ``param_grad``, which a mapping reorders, transposes, fuses or splits
exactly as it does the parameter). Those tensors are handed to
:func:`~tensorparity.mapping.suggest_mapping`, which pairs them by name and content (identical
bytes, transposed, concatenated, RoPE-permuted, cast, close statistics) and writes the rules.

The mapping found is used when it pairs keys the names alone do not, or pairs same-named keys
through a transform (rows permuted for another RoPE convention); it is printed in the report and
``--save-map`` writes it for review. Two traces of one implementation (the same keys, the same
content fingerprints) need no search. In ``stats`` mode a trace stores each parameter's content
signature instead (row and column digests: :func:`tensorparity.mapping.param_signature`), from
which :func:`~tensorparity.mapping.suggest_from_signatures` finds the same mapping. A trace with
neither (``params=False``, older traces) is aligned by names, else by execution order, and the
report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tensorparity.checkpoint import open as open_checkpoint
from tensorparity.checkpoint.tracefolder.records import TraceRecord
from tensorparity.checkpoint.tree import LazyTensor
from tensorparity.errors import TensorParityError
from tensorparity.mapping import Mapping, Rule, Suggestion, apply_mapping, suggest_from_signatures, suggest_mapping
from tensorparity.mapping._param_signature import SCHEMA, ParamSignature

__all__ = ["Found", "extend_by_names", "find_mapping", "stored_parameters"]

_MIN_SHARE = 0.5  # of the smaller side's parameters the suggestion must pair


@dataclass(frozen=True)
class Found:
    """What the search found: the mapping (``None`` when none is needed or none was found), the
    suggestion it came from, and a sentence for the report."""

    mapping: Mapping | None
    suggestion: Suggestion | None
    note: str


def _key(r: TraceRecord) -> str:
    return f"{r.module}.{r.path}" if r.module else r.path


def stored_parameters(records: Any) -> tuple[dict[str, TraceRecord], str]:
    """A trace's parameters as stored records, and which kind they are: ``param`` records where
    the trace has them, else ``param_grad`` records; empty where it stored neither."""
    for kind in ("param", "param_grad"):
        found = {}
        for r in records:
            if r.kind == kind and r.is_tensor and r.call == 0:
                found.setdefault(_key(r), r)
        if found and all(r.stored for r in found.values()):
            return found, kind
    return {}, ""


def _entries(source: Any, records: dict[str, TraceRecord]) -> Any:
    def loader(r: TraceRecord) -> Any:
        return lambda: source.load(r)

    return open_checkpoint({k: LazyTensor(tuple(r.shape), getattr(torch, r.dtype), 0, r.key, loader(r))
                            for k, r in records.items()})


def signatures(source: Any) -> dict[str, Any]:
    """A trace's parameter signatures (``param_signature`` records, stats mode) by ``owner.name``,
    with the statistics of their ``param`` record; empty where it has none."""
    params = {_key(r): r for r in source.records if r.kind == "param" and r.is_tensor}
    out = {}
    for r in source.records:
        if r.kind != "param_signature" or not r.stored or _key(r) not in params:
            continue
        p = params[_key(r)]
        s = p.stats
        stats = None
        if s is not None and s.numel:
            stats = [s.mean, s.std, s.min, s.max, s.norm / max(1, s.numel - s.nan - s.inf) ** 0.5]
        out[_key(r)] = ParamSignature.from_tensors(source.load(r), {"schema": SCHEMA, "shape": list(p.shape),
                                                                    "dtype": p.dtype, "stats": stats})
    return out


def _from_signatures(src_a: Any, src_b: Any) -> Found | None:
    """The search on the parameters' signatures, where neither trace stored the tensors."""
    sig_a, sig_b = signatures(src_a), signatures(src_b)
    if not sig_a or not sig_b:
        return None
    if sig_a.keys() == sig_b.keys() and all(sig_a[k] == sig_b[k] for k in sig_a):
        return Found(None, None, "")
    suggestion = suggest_from_signatures(sig_a, sig_b)
    if not any(p.transform is not None or p.a_keys != p.b_keys for p in suggestion.pairs):
        return Found(None, suggestion, "")
    mapping = extend_by_names(suggestion, {k: (tuple(s.shape), str(s.dtype).removeprefix("torch."))
                                           for k, s in sig_a.items()},
                              {k: (tuple(s.shape), str(s.dtype).removeprefix("torch.")) for k, s in sig_b.items()})
    return Found(mapping, suggestion, f"no mapping was given: found one from the traces' parameter signatures "
                                      f"({suggestion.summary()}); {len(mapping.rules)} rules used")


def find_mapping(src_a: Any, src_b: Any) -> Found:
    """Search the mapping between two traces' parameters (see the module docstring)."""
    params_a, kind_a = stored_parameters(src_a.records)
    params_b, kind_b = stored_parameters(src_b.records)
    if kind_a != "param" or kind_b != "param":
        try:
            by_signature = _from_signatures(src_a, src_b)
        except TensorParityError as exc:
            by_signature = Found(None, None, f"the traces' parameter signatures could not be read ({exc.message})")
        if by_signature is not None:
            return by_signature
    if not params_a or not params_b:
        return Found(None, None, "no mapping was given and the traces store no parameters to find one from "
                                 "(capture in full mode, or pass --map)")
    same_keys = params_a.keys() == params_b.keys()
    if same_keys and all(_same(params_a[k], params_b[k]) for k in params_a):
        return Found(None, None, "")
    if kind_a != kind_b:
        return Found(None, None, f"A stores {kind_a} records and B {kind_b}: no mapping searched (pass --map)")
    try:
        suggestion = suggest_mapping(_entries(src_a, params_a), _entries(src_b, params_b), progress=False)
    except TensorParityError as exc:
        return Found(None, None, f"no mapping could be found from the traces' parameters ({exc.message})")
    what = "parameters" if kind_a == "param" else "parameter gradients"
    paired = {k for p in suggestion.pairs for k in p.a_keys}
    smaller = min(len(params_a), len(params_b))
    moved = [p for p in suggestion.pairs if p.transform is not None or p.a_keys != p.b_keys]
    if not moved:
        return Found(None, suggestion, "")
    if len(paired) < _MIN_SHARE * smaller:
        return Found(None, suggestion, f"a mapping searched from the traces' {what} paired only {len(paired)} of "
                                       f"{smaller}: not used (pass --map)")
    mapping = extend_by_names(suggestion, {k: (tuple(r.shape), r.dtype) for k, r in params_a.items()},
                              {k: (tuple(r.shape), r.dtype) for k, r in params_b.items()})
    rules = len(mapping.rules)
    return Found(mapping, suggestion,
                 f"no mapping was given: found one from the traces' {what} ({suggestion.summary()}); "
                 f"{rules} rule{'s' if rules != 1 else ''} used (--save-map FILE writes it)")


def _same(a: TraceRecord, b: TraceRecord) -> bool:
    sa, sb = a.stats, b.stats
    return (tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and sa is not None and sb is not None
            and bool(sa.hash) and sa.hash == sb.hash)


def _templated(key: str, digits: dict[str, str]) -> str | None:
    parts = key.split(".")
    out = [f"{{{digits[p]}}}" if p in digits else p for p in parts]
    return ".".join(out)


def extend_by_names(suggestion: Suggestion, shapes_a: dict[str, tuple[tuple[int, ...], str]],
                    shapes_b: dict[str, tuple[tuple[int, ...], str]]) -> Mapping:
    """The suggested mapping, with each literal rule that names one layer (``h.0.attn.c_attn.weight
    -> [blocks.0.attn.q.weight, ...]``) made a template over its layer index where the keys the
    template adds are exactly keys the content left unmatched, on both sides, in the shapes the
    rule's transform makes. A port with a bug in one layer's weights (v loaded with k's) has no
    content match there; the names say which keys correspond, and the comparison then shows the
    values differ, instead of leaving the layer unpaired."""
    from dataclasses import replace as _replace

    mapping = suggestion.mapping
    left_a, left_b = set(suggestion.unmatched_a), set(suggestion.unmatched_b)
    if not left_a or not left_b:
        return mapping
    rules = list(mapping.rules)
    changed = False
    for n, rule in enumerate(rules):
        if rule.regex or any("{" in t for t in rule.a + rule.b):
            continue
        numbers = {p for k in rule.a for p in k.split(".") if p.isdigit()}
        if len(numbers) != 1 or not all(numbers <= set(k.split(".")) for k in rule.b):
            continue
        slot = {numbers.pop(): "i"}
        try:
            candidate = Rule(tuple(_templated(k, slot) for k in rule.a), tuple(_templated(k, slot) for k in rule.b),
                             rule.transform, note=rule.note)  # type: ignore[arg-type]
        except TensorParityError:
            continue
        trial = mapping.with_rules([*rules[:n], candidate, *rules[n + 1:]])
        claimed = {k for k in shapes_a if candidate.match(k)}
        new_a = claimed - set(rule.a)
        if not new_a or not new_a <= left_a:
            continue
        try:
            meta = {k: torch.empty(shapes_a[k][0], dtype=getattr(torch, shapes_a[k][1]), device="meta")
                    for k in claimed}
            made = apply_mapping(meta, _replace(trial, rules=(candidate,), passthrough=False)).checkpoint
        except (TensorParityError, ValueError, RuntimeError):
            continue
        new_b = set(made) - set(rule.b)
        if not new_b <= left_b or any(k not in shapes_b or tuple(made[k].shape) != shapes_b[k][0] for k in new_b):
            continue
        rules[n] = candidate
        left_a -= new_a
        left_b -= new_b
        changed = True
    return mapping.with_rules(rules) if changed else mapping
