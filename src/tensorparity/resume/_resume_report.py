"""The record :func:`tensorparity.resume_check` returns, and its renderings: rich (terminal), HTML
(notebook) and JSON (schema ``tensorparity.resume/1``).

A :class:`ResumeReport` holds one :class:`ResumeLeg` per resume point (or one for a chain of
them). A leg is one or more :class:`Segment` s — load a checkpoint in a fresh process, run to the
next save point or the end — each with its step table (:class:`StepRow`: the uninterrupted run's
fingerprint beside the resumed run's), the component audit right after the load and at its end
(:class:`Finding`), and the first :class:`Divergence`. :class:`Confirmation` s record the re-runs
that took a suspected component from the uninterrupted run. The verdict is ``pass`` (every step
and every component of the final state match) or ``resume bug``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tensorparity.numerics import Tolerance
from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import jsonable, plural, record_dict
from tensorparity.resume._resume_report_render import html_report, rich_report

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["SCHEMA", "Confirmation", "Divergence", "Finding", "ResumeLeg", "ResumeReport", "Segment", "StepRow",
           "Verdict"]

SCHEMA = "tensorparity.resume/1"
Verdict = Literal["pass", "resume bug"]


@dataclass(frozen=True)
class StepRow:
    """One step of the uninterrupted run (``_a``) beside the same step of the resumed run (``_b``).

    Attributes:
        step: the step number (1-based).
        epoch, batch: where the uninterrupted run's batch came from; ``epoch_b``, ``batch_b``
            where the resumed run believed its batch came from.
        loss_a, loss_b, grad_a, grad_b, lr_a, lr_b: loss, gradient norm and learning rate.
        batch_same, loss_same, grad_same: judged (batches bitwise, floats by the tolerance).
        params_same: every tensor of the model's state bitwise equal after the step; ``None``
            when the tolerance is not bitwise (the final state is judged instead).
        params_differing, n_params_differing, n_params: the first tensors that differ, how many.
        batch_b_from: when the batches differ, the step of the uninterrupted run that had the
            resumed run's batch (``1``: the data loader restarted from the start).
    """

    step: int
    epoch: int
    batch: int
    epoch_b: int
    batch_b: int
    loss_a: float | None
    loss_b: float | None
    grad_a: float | None
    grad_b: float | None
    lr_a: float | None
    lr_b: float | None
    batch_same: bool
    loss_same: bool
    grad_same: bool
    params_same: bool | None
    params_differing: tuple[str, ...] = ()
    n_params_differing: int = 0
    n_params: int = 0
    batch_b_from: int | None = None

    @property
    def match(self) -> bool:
        return self.batch_same and self.loss_same and self.grad_same and self.params_same is not False

    def differences(self) -> tuple[str, ...]:
        """What differs, in words: ``('batch', 'loss', 'parameters')``."""
        return tuple(name for name, same in (("batch", self.batch_same), ("loss", self.loss_same),
                                             ("grad norm", self.grad_same), ("parameters", self.params_same))
                     if same is False)

    def to_dict(self) -> dict[str, Any]:
        return {**record_dict(self), "match": self.match}


@dataclass(frozen=True)
class Finding:
    """A component of the state that differs from the uninterrupted run, in the user's words.

    Attributes:
        component: ``model``, ``buffers`` (non-persistent), ``optimizer``, ``scheduler``, ``scaler``,
            ``extras.<name>``, ``grads``, ``mode``, ``data``, ``rng.python``, ``rng.numpy``, ``rng.torch``,
            ``rng.cuda``.
        message: what differs and what it means (``"optimizer state was not restored: exp_avg,
            exp_avg_sq and step of 16 parameters are missing"``).
        at: the step the state was taken at.
        when: ``load`` (right after the load, before the first resumed step) or ``end``.
        keys, n_keys: the first differing state keys, and how many differ.
        confirmed: whether taking this component from the uninterrupted run made the resumed run
            match (``None``: not re-run).
    """

    component: str
    message: str
    at: int
    when: Literal["load", "end"] = "load"
    keys: tuple[str, ...] = ()
    n_keys: int = 0
    confirmed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class Divergence:
    """Where the resumed run first parts from the uninterrupted one.

    Attributes:
        step: the first step that differs; ``None`` when every step matches and only the state at
            the end differs (an EMA, say, never feeds back into the loss).
        what: what differs at that step (``batch``, ``loss``, ``grad norm``, ``parameters``) or
            ``("final state",)``.
        tensor: the first tensor (or state key) that differs.
        message: one line.
    """

    step: int | None
    what: tuple[str, ...]
    tensor: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class Confirmation:
    """A re-run of the resumed leg with some components taken from the uninterrupted run.

    Attributes:
        components: the components swapped in right after the load.
        passed: whether the re-run matches the uninterrupted run (every step and the end state).
        first_divergent_step: where the re-run still differs, if it does.
        message: one line.
    """

    components: tuple[str, ...]
    passed: bool
    first_divergent_step: int | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class Segment:
    """One fresh process of a leg: load the checkpoint of step ``start``, run to ``stop``.

    Attributes:
        start, stop: the steps before and after.
        rows: one :class:`StepRow` per step ``start + 1 .. stop``.
        findings: the audit right after the load against the uninterrupted run at ``start``.
        end: the state at ``stop`` against the uninterrupted run at ``stop``.
        divergence: where it first differs, ``None`` when it matches.
        notes: what else the reader should know (keys a non-strict load skipped harmlessly).
        wall_s: seconds the process spent on the segment.
    """

    start: int
    stop: int
    rows: tuple[StepRow, ...]
    findings: tuple[Finding, ...]
    end: tuple[Finding, ...]
    divergence: Divergence | None
    notes: tuple[str, ...] = ()
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.divergence is None

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "passed": self.passed,
                "divergence": self.divergence.to_dict() if self.divergence else None,
                "findings": [f.to_dict() for f in self.findings], "end": [f.to_dict() for f in self.end],
                "steps": [r.to_dict() for r in self.rows], "notes": list(self.notes), "wall_s": self.wall_s}


@dataclass(frozen=True)
class ResumeLeg:
    """One resume scenario: save at ``points[0]``, resume in a fresh process (and, chained, save
    and resume again at each further point), run to the end.

    Attributes:
        points: the resume points, ``(4,)`` or a chain ``(3, 6)``.
        segments: one per fresh process.
        confirmations: re-runs of the first failing segment.
    """

    points: tuple[int, ...]
    segments: tuple[Segment, ...]
    confirmations: tuple[Confirmation, ...] = ()

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.segments)

    @property
    def label(self) -> str:
        return "resume at " + " → ".join(map(str, self.points)) + (" (chained)" if len(self.points) > 1 else "")

    @property
    def failing(self) -> Segment | None:
        """The first segment that differs."""
        return next((s for s in self.segments if not s.passed), None)

    @property
    def rows(self) -> tuple[StepRow, ...]:
        return tuple(r for s in self.segments for r in s.rows)

    def diagnosis(self) -> str:
        """One line: what went wrong first and why, or that it matches."""
        seg = self.failing
        if seg is None:
            return f"{self.label}: matches"
        assert seg.divergence is not None
        cause = [f for f in seg.findings if f.confirmed] or list(seg.findings) or list(seg.end)
        why = "; ".join(f.message + (" (confirmed)" if f.confirmed else "") for f in cause[:2])
        return f"{self.label}: {seg.divergence.message}" + (f" — {why}" if why else "")

    def to_dict(self) -> dict[str, Any]:
        return {"points": list(self.points), "label": self.label, "passed": self.passed,
                "diagnosis": self.diagnosis(), "segments": [s.to_dict() for s in self.segments],
                "confirmations": [c.to_dict() for c in self.confirmations]}


@dataclass(frozen=True)
class ResumeReport:
    """Resumed runs compared with the uninterrupted run: what :func:`tensorparity.resume_check`
    returns.

    Attributes:
        recipe: the recipe's name.
        steps: steps in each run.
        legs: one per resume point, or one for a chain.
        tolerance: how close is close enough (bitwise by default).
        profile: ``bitwise``, ``dtype`` or ``custom``.
        checkpoint: whose save/load was tested.
        accumulate: micro-batches per optimizer step.
        steps_per_epoch: batches per epoch, when the data loader has a length.
        reference: what the two uninterrupted runs showed.
        isolation: how legs got their fresh processes (``fork`` from a pristine server, or
            ``spawn``: a new interpreter each).
        notes: what else the reader should know.
        wall_s: seconds the whole check took.

    Example:
        >>> from tensorparity.numerics import Tolerance
        >>> r = ResumeReport(recipe="r.py:R", steps=4, legs=(), tolerance=Tolerance(exact=True))
        >>> r.verdict, r.exit_code
        ('pass', 0)
    """

    recipe: str
    steps: int
    legs: tuple[ResumeLeg, ...]
    tolerance: Tolerance
    profile: str = "bitwise"
    checkpoint: str = "tensorparity's default save/load"
    accumulate: int = 1
    steps_per_epoch: int | None = None
    reference: str = ""
    isolation: str = "spawn"
    notes: tuple[str, ...] = ()
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return all(leg.passed for leg in self.legs)

    @property
    def verdict(self) -> Verdict:
        return "pass" if self.passed else "resume bug"

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 pass, 1 resume bug (errors never get this far: 2)."""
        return 0 if self.passed else 1

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Every finding of every leg, right after each load first."""
        return tuple(f for leg in self.legs for s in leg.segments for f in (*s.findings, *s.end))

    def summary(self) -> str:
        """One line: the verdict and its reason.

        Example:
            >>> from tensorparity.numerics import Tolerance
            >>> ResumeReport(recipe="r", steps=8, legs=(), tolerance=Tolerance(exact=True)).summary()
            'pass: 0 resume points over 8 steps, bitwise'
        """
        points = sorted({p for leg in self.legs for p in leg.points})
        if self.passed:
            where = ", ".join(map(str, points))
            return (f"pass: {plural(len(points), 'resume point')}{' (' + where + ')' if where else ''} over "
                    f"{self.steps} steps, {self.profile}")
        bad = [leg for leg in self.legs if not leg.passed]
        return f"resume bug: {bad[0].diagnosis()}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.resume/1", ...}`` (strict JSON)."""
        return jsonable({
            "schema": SCHEMA, "verdict": self.verdict, "passed": self.passed, "exit_code": self.exit_code,
            "summary": self.summary(), "recipe": self.recipe, "steps": self.steps,
            "steps_per_epoch": self.steps_per_epoch, "accumulate": self.accumulate, "checkpoint": self.checkpoint,
            "tolerance": {"profile": self.profile, "description": self.tolerance.describe(),
                          **self.tolerance.to_dict()},
            "reference": self.reference, "isolation": self.isolation, "legs": [leg.to_dict() for leg in self.legs], "notes": list(self.notes),
            "wall_s": self.wall_s})

    to_json = report_json

    def renderable(self, *, top: int = 10) -> RenderableType:
        """A rich renderable: header, verdict, then each leg's step table (``top`` steps around
        the first divergence), audit and confirmations."""
        return rich_report(self, top)

    def to_html(self, *, top: int = 50) -> str:
        """A self-contained HTML fragment (what a notebook shows)."""
        return html_report(self, top)

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = report_text

    def __repr__(self) -> str:
        return f"<ResumeReport {self.recipe!r}: {self.summary()}>"
