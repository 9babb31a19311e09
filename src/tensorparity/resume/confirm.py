"""Confirming a diagnosis: re-run the resumed leg with the suspected component taken from the
uninterrupted run, and show that the divergence disappears.

The audit says what differs right after the load; several components may differ, and one that
differs need not be the cause. For each suspect, the failing segment is run again in a fresh
process: the checkpoint is loaded as before, then that one component is overwritten with the
uninterrupted run's state at the same step (:func:`tensorparity.resume.state.restore` with
``only=``). If the re-run matches the uninterrupted run — every step and the end state — the
suspect is confirmed. When no single suspect is enough, all of them are swapped in together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tensorparity.resume._resume_report import Confirmation, Finding, Segment

__all__ = ["MAX_SUSPECTS", "conclude", "plan"]

MAX_SUSPECTS = 6


def plan(findings: Sequence[Finding]) -> list[tuple[str, ...]]:
    """The re-runs to make: each suspected component alone, then all of them together.

    Example:
        >>> f = [Finding("optimizer", "...", 4), Finding("rng.torch", "...", 4)]
        >>> plan(f)
        [('optimizer',), ('rng.torch',), ('optimizer', 'rng.torch')]
    """
    suspects = list(dict.fromkeys(f.component for f in findings))[:MAX_SUSPECTS]
    runs = [(c,) for c in suspects]
    if len(suspects) > 1:
        runs.append(tuple(suspects))
    return runs


def _names(components: Sequence[str]) -> str:
    items = list(components)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def conclude(runs: Sequence[tuple[tuple[str, ...], Segment]],
             findings: Sequence[Finding]) -> tuple[tuple[Confirmation, ...], tuple[Finding, ...]]:
    """Turn the re-runs into confirmations, and mark each finding confirmed or not.

    A finding is confirmed when taking its component alone makes the resumed run match, or when
    no single component does but all suspects together do (then each is part of the cause).

    Example:
        >>> ok = Segment(4, 8, (), (), (), None)
        >>> confirmations, marked = conclude([(("optimizer",), ok)], [Finding("optimizer", "lost", 4)])
        >>> confirmations[0].passed, marked[0].confirmed
        (True, True)
    """
    confirmations = []
    alone: dict[str, bool] = {}
    together = False
    for components, seg in runs:
        names = _names(components)
        first = seg.divergence.step if seg.divergence else None
        if seg.passed:
            message = (f"taking {names} from the uninterrupted run makes the resumed run match it at every step and "
                       f"at the end: confirmed")
        else:
            assert seg.divergence is not None
            message = f"taking {names} from the uninterrupted run is not enough: {seg.divergence.message}"
        confirmations.append(Confirmation(components, seg.passed, first, message))
        if len(components) == 1:
            alone[components[0]] = seg.passed
        else:
            together = seg.passed
    any_alone = any(alone.values())
    marked = []
    for f in findings:
        if f.component not in alone:
            marked.append(f)
            continue
        confirmed = alone[f.component] or (together and not any_alone)
        marked.append(dataclasses.replace(f, confirmed=confirmed))
    return tuple(confirmations), tuple(marked)
