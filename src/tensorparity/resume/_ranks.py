"""Judging distributed legs: every rank's fingerprints and states, one verdict that names the rank.

A distributed leg comes back as one :class:`~tensorparity.resume.runner.RunResult` per rank.
:func:`combine` makes the leg's own record of each step from them: the loss averaged over the
ranks, the gradient norm rank 0 saw (global: DDP averaged it, a sharded one was reduced), the
batch as every rank's batch in rank order, and every rank's model tensors. Across world sizes
(saved on N ranks, resumed on M) the batch is the *multiset* of samples all ranks trained on
together (a global batch split over 2 ranks is the same samples as on 1), and the model tensors
are left to the states (their shards differ by construction).

:func:`judge` audits each rank's state right after the load and at the end against the same rank
of the uninterrupted run, and names the rank where only some ranks differ ("rank 1's torch CPU RNG
state differs"). Across world sizes each resumed rank is compared with rank 0 of the
uninterrupted run, leaving out what cannot be resharded: a rank's own RNG states and generators,
and every key whose value differs between the uninterrupted run's ranks — said in a note, never
reported as lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from tensorparity.numerics import Tolerance
from tensorparity.report._render import plural
from tensorparity.resume._resume_report import Finding, Segment
from tensorparity.resume.audit import audit, divergence, state_diff
from tensorparity.resume.fingerprint import StepRecord, compare_records

# A RunResult (tensorparity.resume.runner, which imports this module): typed loosely here.
RunResult = Any

__all__ = ["combine", "judge", "per_rank_keys"]

# State that belongs to one process whatever the recipe does: never resharded.
_OWN = re.compile(r"^(rng\.|data\.progress\.epoch_rng|data\.generators)")


def _hash(parts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()


def combine(ranks: Sequence[RunResult], *, across: bool) -> RunResult:
    """One leg's result from its ranks' results (rank order); ``across``: fingerprints that
    compare with a run on another number of ranks."""
    first = ranks[0]
    records = []
    for i, r0 in enumerate(first.records):
        steps = [r.records[i] for r in ranks]
        losses = [s.loss for s in steps]
        loss = None if any(v is None for v in losses) else sum(losses) / len(losses)  # type: ignore[arg-type]
        if across:
            batch = _hash(sorted(h for s in ranks for h in s.samples.get(str(r0.step), ())))
            tensors: dict[str, str] = {}
        else:
            batch = _hash([s.batch_hash for s in steps])
            tensors = {k: _hash([s.tensors.get(k, "") for s in steps]) for k in r0.tensors}
        records.append(StepRecord(r0.step, r0.epoch, r0.batch, batch, loss, r0.loss_dtype, r0.grad_norm, r0.lr,
                                  r0.updated, tensors))
    return dataclasses.replace(first, records=tuple(records), ranks=tuple(ranks),
                               meta={**first.meta, "world": len(ranks)})


def per_rank_keys(states: Sequence[Any], *, tolerance: Tolerance) -> list[str]:
    """The state keys whose values differ between ranks (each rank's own state)."""
    keys: set[str] = set()
    for other in states[1:]:
        report = state_diff(states[0], other, tolerance=tolerance)
        keys.update(t.key for t in report.tensors if not t.passed)
        keys.update(v.key for v in report.values)
        keys.update(k.key for k in (*report.only_in_a, *report.only_in_b))
    return sorted(keys)


def _exclude(keys: Sequence[str]) -> str:
    return "|".join([_OWN.pattern, *(f"^{re.escape(k)}$" for k in keys)])


def _ranked(message: str, rank: int) -> str:
    head, sep, rest = message.partition(", ") if message.startswith("after step ") else ("", "", message)
    if rest.startswith(("torch CPU RNG", "CUDA RNG", "numpy global RNG", "python random", "the RNG in extras")):
        said = f"rank {rank}'s {rest.removeprefix('the ')}"
    else:
        said = f"on rank {rank}, {rest}"
    return f"{head}{sep}{said}"


def _merge(per_rank: Sequence[Sequence[Finding]]) -> tuple[Finding, ...]:
    """One finding where every rank says the same; otherwise one per rank, naming it."""
    components = list(dict.fromkeys(f.component for findings in per_rank for f in findings))
    out: list[Finding] = []
    for component in components:
        found = [(rank, next((f for f in findings if f.component == component), None))
                 for rank, findings in enumerate(per_rank)]
        messages = {f.message for _, f in found if f is not None}
        if all(f is not None for _, f in found) and len(messages) == 1:
            out.append(found[0][1])  # type: ignore[arg-type]
            continue
        out += [dataclasses.replace(f, message=_ranked(f.message, rank)) for rank, f in found if f is not None]
    return tuple(out)


def judge(reference: RunResult, resumed: RunResult, *, tolerance: Tolerance, accumulate: int = 1,
          audit_load: bool = True) -> Segment:
    """:func:`~tensorparity.resume.runner.judge_segment` for distributed legs: each rank audited."""
    start, stop = resumed.start, resumed.stop
    rows = compare_records(reference.records, resumed.records, tolerance)
    across = len(reference.ranks) != len(resumed.ranks)
    notes: list[str] = []
    excluded: dict[int, str | None] = {}
    own: set[str] = set()
    for at in (start, stop):
        if across:
            keys = per_rank_keys([r.snapshots[at] for r in reference.ranks], tolerance=tolerance)
            own.update(keys)
            excluded[at] = _exclude(keys)
        else:
            excluded[at] = None
    loads: list[tuple[Finding, ...]] = []
    ends: list[tuple[Finding, ...]] = []
    for rank, run in enumerate(resumed.ranks):
        ref = reference.ranks[0 if across else rank]
        if audit_load and run.after_load is not None:
            found, said = audit(state_diff(ref.snapshots[start], run.after_load, tolerance=tolerance,
                                           exclude=excluded[start]),
                                at=start, meta=run.meta, load_calls=run.load_calls, rows=rows, accumulate=accumulate)
            loads.append(found)
            notes += [n for n in said if n not in notes]
        end, _ = audit(state_diff(ref.snapshots[stop], run.snapshots[stop], tolerance=tolerance,
                                  exclude=excluded[stop]), at=stop, when="end", meta=run.meta, accumulate=accumulate)
        ends.append(end)
    findings, end_findings = _merge(loads) if loads else (), _merge(ends)
    diverged = divergence(rows, end_findings, stop=stop)
    if across:
        seen = sorted(own)
        shown = ", ".join(seen[:4]) + (f" and {len(seen) - 4} more" if len(seen) > 4 else "")
        notes.append(f"saved on {plural(len(reference.ranks), 'rank')}, resumed on {len(resumed.ranks)}: a rank's own "
                     f"state cannot be resharded, so every rank's RNG states and data-loader generators were left out "
                     f"of the comparison" + (f", and so was what differs between the saving ranks ({shown})" if seen
                                             else "") + "; each resumed rank keeps what its load() gave it")
        if diverged is not None and not findings:
            notes.append("no reshardable component differs right after the load, yet the run diverges: the cause "
                         "may be what was left out (a rank's own RNG drawn for dropout or the data order)")
    elif diverged is not None and audit_load and not findings:
        notes.append("no component differs right after the load on any rank, yet the run diverges: the cause is "
                     "state tensorparity cannot see (module-level counters or caches, a generator the recipe does "
                     "not return in extras)")
    return Segment(start, stop, rows, findings, end_findings, diverged, tuple(notes), resumed.wall_s)
