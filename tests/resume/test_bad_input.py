"""Bad input is reported as what it is — one line naming the recipe and the fix, exit 2 in the
CLI — and never as a resume bug."""

from __future__ import annotations

import pytest
from _cli_helpers import assert_one_line_error
from resume_test_recipes import spec
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.errors import UsageError
from tensorparity.resume import NondeterminismError, RecipeError, resume_check


def _check(name: str, **options: object) -> None:
    resume_check(spec(name), steps=options.pop("steps", 5), resume_at=options.pop("resume_at", 2),  # type: ignore[arg-type]
                 confirm=False, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "needles"), [
    ("FailsToBuild", ("the recipe's build() raised ValueError: no such dataset: /data/train", "fix the recipe's "
                      "build()")),
    ("FailsToStep", ("the recipe's step() raised RuntimeError at step 3: mat1 and mat2 shapes cannot be multiplied",)),
    ("SavesNothing", ("the recipe's save() wrote nothing at step 2", "fix: write the checkpoint to the path")),
    ("LoadRaises", ("the recipe's load() raised KeyError", "'state_dict'")),
    ("RunsShort", ("the data loader yielded no batch in epoch 1 (after 3 steps)", "re-iterable")),
    ("ModuleCounter", ("a second build() in one process trained differently from the first (step 1: batch",
                       "no module-level counters")),
    ("NotARecipe", ("NotARecipe is not a usable recipe: it has no build() method",)),
])
def test_recipe_failures_are_recipe_errors(name: str, needles: tuple[str, ...]) -> None:
    with pytest.raises(RecipeError) as info:
        _check(name)
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


def test_nondeterministic_training_is_not_a_resume_bug() -> None:
    with pytest.raises(NondeterminismError) as info:
        _check("Nondeterministic")
    text = str(info.value)
    assert "the two uninterrupted runs already differ at step 1 (loss)" in text
    assert "torch.use_deterministic_algorithms(True)" in text


def test_unresolvable_names() -> None:
    with pytest.raises(RecipeError, match="no such Python file"):
        resume_check("missing/recipe.py:Recipe", steps=4, resume_at=2)
    with pytest.raises(RecipeError, match="has no attribute 'Nope'"):
        resume_check(spec("Nope"), steps=4, resume_at=2)
    with pytest.raises(RecipeError, match="defined inside a function"):
        class Local:  # noqa: B903
            pass
        resume_check(Local, steps=4, resume_at=2)


@pytest.mark.parametrize(("options", "needle"), [
    ({"steps": 1, "resume_at": 1}, "steps must be an integer >= 2"),
    ({"steps": 5, "resume_at": 5}, "resume point(s) 5 not between 1 and steps - 1 = 4"),
    ({"steps": 5, "resume_at": [2, 2]}, "resume points repeat"),
    ({"steps": 5, "resume_at": 2, "tolerance": "loose"}, "tolerance must be 'bitwise', 'dtype' or a Tolerance"),
    ({"steps": 5, "resume_at": 2, "isolation": "thread"}, "isolation must be 'fork' (Linux) or 'spawn'"),
    ({"steps": 5, "resume_at": 2, "threads": 0}, "threads must be a positive integer or None"),
])
def test_option_errors(options: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        resume_check(spec("ManualRecipe"), **options)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_cli_reports_bad_input_on_one_line_with_exit_2() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["resume-check", spec("Nondeterministic"), "--steps", "4", "--resume-at", "2"])
    assert_one_line_error(result, "error: the two uninterrupted runs already differ", "fix:")
    result = runner.invoke(app, ["resume-check", spec("SavesNothing"), "--steps", "4", "--resume-at", "2"])
    assert_one_line_error(result, "error:", "save() wrote nothing")
    result = runner.invoke(app, ["resume-check", spec("ManualRecipe"), "--steps", "4", "--resume-at", "9"])
    assert_one_line_error(result, "resume point(s) 9 not between 1 and steps - 1 = 3")
    result = runner.invoke(app, ["resume-check", spec("ManualRecipe"), "--steps", "4", "--resume-at", "2",
                                 "--tolerance", "bitwise", "--atol", "1e-3"])
    assert_one_line_error(result, "--tolerance bitwise compares bytes")
