"""What could make a verdict wrong, read from the two traces' provenance and records: different
inputs (the verdict becomes ``inputs differ``), schema versions, model classes, train/eval modes,
seeds, dtypes, and traces that hardly pair. Each is a warning in the report, never a silent verdict.
"""

from __future__ import annotations

from typing import Any

from tensorparity.checkpoint.tracefolder.records import same_content
from tensorparity.trace._trace_report import TraceSide
from tensorparity.trace.align import Alignment, RecordSource

__all__ = ["provenance_checks"]


def _input_hash(prov: dict[str, Any]) -> str | None:
    value = prov.get("input_hash")
    if value is None and isinstance(prov.get("input"), dict):
        value = prov["input"].get("hash")
    return str(value) if value else None


def provenance_checks(src_a: RecordSource, src_b: RecordSource, side_a: TraceSide, side_b: TraceSide,
            alignment: Alignment) -> tuple[list[str], list[str], bool]:
    """Warnings about what could make a verdict wrong, notes, and whether the inputs differ."""
    pa, pb = side_a.provenance, side_b.provenance
    warnings: list[str] = []
    notes: list[str] = []
    if pa.get("schema") and pb.get("schema") and pa["schema"] != pb["schema"]:
        warnings.append(f"the traces have different schema versions (A: {pa['schema']}, B: {pb['schema']}); "
                        "records may mean different things")
    if side_a.model_class and side_b.model_class and side_a.model_class != side_b.model_class:
        text = f"the traces come from different model classes (A: {side_a.model_class}, B: {side_b.model_class})"
        (warnings if alignment.method == "name" else notes).append(
            text + (" but were aligned by name" if alignment.method == "name" else f", aligned by {alignment.method}"))
    if pa.get("training") is not None and pb.get("training") is not None and pa["training"] != pb["training"]:
        mode = {True: "train", False: "eval"}
        warnings.append(f"A ran in {mode[bool(pa['training'])]} mode and B in {mode[bool(pb['training'])]} mode: "
                        "dropout and batch norm compute different things")
    for key in ("seed", "dtype"):
        if pa.get(key) is not None and pb.get(key) is not None and pa[key] != pb[key]:
            warnings.append(f"the runs used different {key}s (A: {pa[key]}, B: {pb[key]})")
    ha, hb = _input_hash(pa), _input_hash(pb)
    differ = bool(ha and hb and ha != hb)
    inputs_a = {r.path: r.stats.hash for r in src_a.records if r.kind == "model_input" and r.stats and r.stats.hash}
    for r in src_b.records:
        if r.kind == "model_input" and r.stats and same_content(inputs_a.get(r.path, ""), r.stats.hash) is False:
            differ = True
    if differ:
        warnings.insert(0, "THE INPUTS DIFFER: the two runs were fed different inputs (their hashes differ), so "
                           "every layer is expected to differ; capture both from the same input")
    larger = len(alignment.matches) + max(len(alignment.only_a), len(alignment.only_b))
    if not alignment.matches:
        warnings.append("no layer of A could be paired with a layer of B: pass a mapping (--map), or align by order")
    elif len(alignment.matches) < 0.5 * larger:
        warnings.append(f"only {len(alignment.matches)} of {larger} layers could be paired: are these traces of "
                        "the same model? (a mapping, --map, pairs renamed layers)")
    return warnings, notes, differ
