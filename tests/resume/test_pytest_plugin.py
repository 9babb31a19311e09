"""The pytest plugin, run the way users run it: a test file that uses it, under pytest's own
``pytester``. A correct recipe passes silently; a forgetful one fails with the diagnosis as its
message (no traceback of tensorparity's internals); a recipe that fails to build is an error
that says so, not a resume bug."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from resume_test_recipes import HERE

pytest_plugins = ["pytester"]

_TESTS = f'''
from tensorparity.examples.resume_recipes import Forgetful, TinyRecipe
from tensorparity.pytest_plugin import assert_resumes

def test_correct():
    report = assert_resumes(TinyRecipe, steps=4, resume_at=2, confirm=False)
    assert report.verdict == "pass"

def test_forgets_the_optimizer(tensorparity_resume):
    tensorparity_resume(Forgetful(forget="optimizer"), steps=4, resume_at=2)

def test_recipe_fails_to_build():
    assert_resumes("{HERE}:FailsToBuild", steps=4, resume_at=2)
'''


def test_the_plugin_is_registered_through_its_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("tensorparity") == "tensorparity_pytest"


def test_pass_resume_bug_and_bad_input(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plugin_resume=_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    # The resume bug: the diagnosis is the message, with the step, the tensor and the forgotten state.
    result.stdout.fnmatch_lines([
        "*tensorparity: * does not resume exactly (4 steps, bitwise)",
        "*resume at 2: step 3 differs first:*",
        "*first divergent tensor: net.*",
        "*optimizer (after the load): optimizer state was not restored: exp_avg, exp_avg_sq and step of 22 "
        "parameters are missing (it starts from scratch)* [[]confirmed]",
    ])
    assert "(at the end)" not in out  # the cause is named; the end state's consequences are in the report
    bug = out[out.index("test_forgets_the_optimizer"):out.index("test_recipe_fails_to_build")]
    assert "tensorparity/resume/" not in bug and "Traceback" not in bug
    # The full report comes with the failure, as a section of the test's report.
    assert "tensorparity resume report" in bug and "Audit right after loading the checkpoint of step 2" in bug
    # Bad input: the recipe's own error, one line with the fix, never called a resume bug.
    bad = out[out.index("_ test_recipe_fails_to_build _"):]
    bad = bad.split("short test summary info")[0]  # the summary (shown with -r) lists every failure
    assert "RecipeError: " in bad and "the recipe's build() raised ValueError: no such dataset: /data/train" in bad
    assert "fix: fix the recipe's build()" in bad and "does not resume exactly" not in bad
    assert "tensorparity/resume/runner.py" not in bad


def test_assert_same_checkpoint(pytester: pytest.Pytester) -> None:
    a, b = pytester.path / "a.pt", pytester.path / "b.pt"
    weights = {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.zeros(2)}
    torch.save(weights, a)
    torch.save({**weights, "layer.weight": weights["layer.weight"] + torch.tensor([[0, 0, 0.5], [0, 0, 0]])}, b)
    pytester.makepyfile(test_plugin_diff=f'''
from tensorparity.pytest_plugin import assert_same_checkpoint

def test_same():
    assert assert_same_checkpoint("{a}", "{a}").verdict == "identical"

def test_different():
    assert_same_checkpoint("{a}", "{b}")

def test_missing_file():
    assert_same_checkpoint("{a}", "{pytester.path / 'nope.pt'}")
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*tensorparity: the checkpoints differ — differs: 1 of 2 tensors outside tolerance (worst layer.weight*",
        "*Common keys: 2 / Only in A: 0 / Only in B: 0 / Shape mismatches: 0 / Value mismatches: 1 → differs",
        "*layer.weight: max abs 0.5, 1 of 6 elements outside * first at [[]0, 2]: 2 vs 2.5",
    ])
    assert "SourceNotFoundError" in result.stdout.str()


def test_loading_the_plugin_imports_neither_torch_nor_tensorparity() -> None:
    """Every pytest session in an environment with tensorparity loads the plugin: it must be cheap."""
    code = ("import sys, tensorparity_pytest; "
            "print(sorted(m for m in ('lightning', 'torchdata', 'torch', 'tensorparity') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
