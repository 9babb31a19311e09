"""Resume check: does save → fresh process → load → continue give exactly what uninterrupted
training gives? If not, what did the checkpoint forget?

Write a :class:`Recipe` (build the training objects, one training step, optionally your own
save/load) and call :func:`resume_check`; the CLI is ``tensorparity resume-check``. See
``docs/resume.md``.

Example:
    >>> from tensorparity.resume import resume_check
    >>> report = resume_check("tensorparity.examples.resume_recipes:TinyRecipe", steps=6,
    ...                       resume_at=3)  # doctest: +SKIP
    >>> report.verdict  # doctest: +SKIP
    'pass'
"""

from tensorparity.resume._recipe_errors import NondeterminismError, RecipeError
from tensorparity.resume._resume_report import (
    Confirmation,
    Divergence,
    Finding,
    ResumeLeg,
    ResumeReport,
    Segment,
    StepRow,
)
from tensorparity.resume.fingerprint import StepRecord
from tensorparity.resume.recipe import Progress, Recipe, TrainingObjects
from tensorparity.resume.runner import RunResult, judge_segment, resume_check
from tensorparity.resume.state import rng_state, set_rng_state

__all__ = [
    "Confirmation",
    "Divergence",
    "Finding",
    "NondeterminismError",
    "Progress",
    "Recipe",
    "RecipeError",
    "ResumeLeg",
    "ResumeReport",
    "RunResult",
    "Segment",
    "StepRecord",
    "StepRow",
    "TrainingObjects",
    "judge_segment",
    "resume_check",
    "rng_state",
    "set_rng_state",
]
