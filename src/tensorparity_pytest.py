"""The pytest plugin: assertions that fail with tensorparity's diagnosis as the message.

Registered through the ``pytest11`` entry point, so installing tensorparity is enough. It is a
top-level module (not inside the ``tensorparity`` package) so that pytest sessions that never use
it do not pay for importing torch. The helpers are also importable as
``tensorparity.pytest_plugin``::

    from tensorparity.pytest_plugin import assert_resumes

    def test_my_checkpoint_resumes():
        assert_resumes("train.py:Recipe", steps=8, resume_at=[3, 6])

    def test_with_the_fixture(tensorparity_resume):  # keeps checkpoints and logs in tmp_path
        tensorparity_resume("train.py:Recipe", steps=8, resume_at=3)

* :func:`assert_resumes` — :func:`tensorparity.resume_check`; a resume bug fails the test with
  one line per failing resume point: the first divergent step and tensor, and the state the
  checkpoint forgot ("optimizer state was not restored: ...", confirmed or not).
* :func:`assert_lightning_resumes` — the same for a real ``lightning.Trainer`` run
  (:func:`tensorparity.integrations.lightning.lightning_resume_check`).
* :func:`assert_same_checkpoint` — :func:`tensorparity.diff`; fails with the classic summary and
  the worst mismatches.

A failure's message is the diagnosis only (no traceback of tensorparity's internals); the full
report is attached to the test's report as a section. Bad input — a recipe that fails to build,
a checkpoint that cannot be opened — is not a failed comparison: the
:class:`~tensorparity.TensorParityError` is raised as it is, one line naming the file and the fix.

This module imports nothing heavy itself (torch, Lightning): the helpers import on use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pytest

if TYPE_CHECKING:
    from tensorparity.checks._diff_report import DiffReport
    from tensorparity.resume._resume_report import ResumeReport

__all__ = ["ResumeChecker", "assert_lightning_resumes", "assert_resumes", "assert_same_checkpoint"]

_T = TypeVar("_T")
_MAX_LISTED = 5
_REPORTS = pytest.StashKey[list[tuple[str, str]]]()
_ITEMS: list[pytest.Item] = []  # the tests running now (a pytester run nests one inside another)


def _attach(title: str, report: Any) -> None:
    """Keep a report's full text for the running test's report (shown when it fails)."""
    if _ITEMS:
        _ITEMS[-1].stash.setdefault(_REPORTS, []).append((title, str(report)))


def _fail(message: str) -> NoReturn:
    __tracebackhide__ = True
    pytest.fail(message, pytrace=False)


def _call(function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call into tensorparity; bad input surfaces as its own one-line error, without the frames
    of tensorparity's internals."""
    __tracebackhide__ = True
    from tensorparity.errors import TensorParityError

    try:
        return function(*args, **kwargs)
    except TensorParityError as exc:
        raise exc.with_traceback(None) from None


def _resume_message(report: ResumeReport) -> str:
    lines = [f"tensorparity: {report.recipe} does not resume exactly ({report.steps} steps, {report.profile})"]
    for leg in report.legs:
        if leg.passed:
            continue
        lines.append(f"  {leg.diagnosis()}")
        seg = leg.failing
        assert seg is not None and seg.divergence is not None
        if seg.divergence.tensor:
            what = "first divergent tensor" if seg.divergence.step is not None else "first differing state key"
            lines.append(f"    {what}: {seg.divergence.tensor}")
        for finding in (seg.findings or seg.end)[:_MAX_LISTED]:  # the cause; the end state only without one
            mark = {True: " [confirmed]", False: " [not confirmed]", None: ""}[finding.confirmed]
            when = "after the load" if finding.when == "load" else "at the end"
            lines.append(f"    {finding.component} ({when}): {finding.message}{mark}")
        lines += [f"    note: {note}" for note in seg.notes]
    matching = [leg.label for leg in report.legs if leg.passed]
    if matching:
        lines.append(f"  matching: {', '.join(matching)}")
    return "\n".join(lines)


def _judge(report: ResumeReport) -> ResumeReport:
    __tracebackhide__ = True
    _attach("tensorparity resume report", report)
    if not report.passed:
        _fail(_resume_message(report))
    return report


def assert_resumes(recipe: Any, *, steps: int, resume_at: int | Sequence[int], **options: Any) -> ResumeReport:
    """Fail the running test unless ``recipe`` resumes exactly (:func:`tensorparity.resume_check`).

    Args:
        recipe: a recipe, its class or its name (``"train.py:Recipe"``).
        steps, resume_at: as for :func:`tensorparity.resume_check`.
        **options: any other option of :func:`tensorparity.resume_check` (``tolerance``,
            ``confirm``, ``chain``, ``workdir`` ...).

    Returns:
        The report, when every resume point matches.

    Raises:
        pytest.fail.Exception: a resume bug; the message is the diagnosis.
        TensorParityError: bad input (the recipe fails to build, an option is wrong,
            nondeterministic training), as it is.

    Example:
        >>> assert_resumes("tensorparity.examples.resume_recipes:TinyRecipe", steps=4,
        ...                resume_at=2).verdict  # doctest: +SKIP
        'pass'
    """
    __tracebackhide__ = True
    from tensorparity.resume import resume_check

    return _judge(_call(resume_check, recipe, steps=steps, resume_at=resume_at, **options))


def assert_lightning_resumes(model: Any, data: Any, *, steps: int, resume_at: int | Sequence[int],
                             **options: Any) -> ResumeReport:
    """Fail the running test unless a real Lightning run resumes exactly through
    ``trainer.fit(ckpt_path=...)`` (:func:`tensorparity.integrations.lightning.lightning_resume_check`).

    Args:
        model, data: the LightningModule and data factories (functions, or their names).
        steps, resume_at: optimizer steps per run, and the step(s) to save and resume at.
        **options: ``trainer``, ``save``, ``tolerance``, ``confirm`` ... as the check takes them.

    Example:
        >>> assert_lightning_resumes("train.py:make_model", "train.py:make_data", steps=8,
        ...                          resume_at=4)  # doctest: +SKIP
    """
    __tracebackhide__ = True
    from tensorparity.integrations.lightning import lightning_resume_check

    return _judge(_call(lightning_resume_check, model, data, steps=steps, resume_at=resume_at, **options))


def _diff_message(report: DiffReport) -> str:
    from tensorparity.report._render import num

    lines = [f"tensorparity: the checkpoints differ — {report.summary()}", f"  {report.classic_summary()}"]
    for t in report.shape_mismatches[:_MAX_LISTED]:
        lines.append(f"  {t.key}: shape {list(t.shape_a)} vs {list(t.shape_b)}")
    for t in report.mismatches[:_MAX_LISTED]:
        at = f", first at {list(t.first_index)}: {num(t.first_a)} vs {num(t.first_b)}" if t.first_index else ""
        lines.append(f"  {t.key}: max abs {num(t.max_abs)}, {t.n_mismatch:,} of {t.numel:,} elements outside "
                     f"{t.tolerance.describe()}{at}")
    for v in report.values[:_MAX_LISTED]:
        lines.append(f"  {v.key}: {v.a} vs {v.b}")
    for side, keys in (("A", report.only_in_a), ("B", report.only_in_b)):
        if keys:
            more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
            lines.append(f"  only in {side}: {', '.join(k.key for k in keys[:_MAX_LISTED])}{more}")
    return "\n".join(lines)


def assert_same_checkpoint(a: Any, b: Any, /, **diff_options: Any) -> DiffReport:
    """Fail the running test unless two checkpoints are the same within tolerance
    (:func:`tensorparity.diff`: identical or close).

    Args:
        a, b: anything :func:`tensorparity.open` takes (paths, modules, state dicts).
        **diff_options: ``tolerance``, ``mapping``, ``include``, ``exclude``, ``weights_only``.

    Example:
        >>> import torch
        >>> assert_same_checkpoint({"w": torch.ones(2)}, {"w": torch.ones(2)}).verdict
        'identical'
    """
    __tracebackhide__ = True
    import tensorparity

    report = _call(tensorparity.diff, a, b, **diff_options)
    _attach("tensorparity diff report", report)
    if not report.passed:
        _fail(_diff_message(report))
    return report


class ResumeChecker:
    """What the ``tensorparity_resume`` fixture gives: :func:`assert_resumes` (called) and
    :meth:`lightning`, keeping every check's checkpoints and logs in the test's ``tmp_path``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def __call__(self, recipe: Any, *, steps: int, resume_at: int | Sequence[int], **options: Any) -> ResumeReport:
        __tracebackhide__ = True
        options.setdefault("workdir", self.workdir)
        return assert_resumes(recipe, steps=steps, resume_at=resume_at, **options)

    def lightning(self, model: Any, data: Any, *, steps: int, resume_at: int | Sequence[int],
                  **options: Any) -> ResumeReport:
        __tracebackhide__ = True
        options.setdefault("workdir", self.workdir)
        return assert_lightning_resumes(model, data, steps=steps, resume_at=resume_at, **options)


@pytest.fixture
def tensorparity_resume(tmp_path: Path) -> ResumeChecker:
    """Check that a recipe (or a Lightning run) resumes exactly; checkpoints and logs stay in
    ``tmp_path / "tensorparity-resume"``."""
    return ResumeChecker(tmp_path / "tensorparity-resume")


# Old-style wrappers (hookwrapper=True): they work with every pytest from 7.0 on.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _ITEMS.append(item)
    try:
        yield
    finally:
        _ITEMS.remove(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for title, text in item.stash.get(_REPORTS, []):
            report.sections.append((title, text))
