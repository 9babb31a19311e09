"""Acceptance of the resume check: a correct recipe passes bitwise; every negative control is
detected, named in the user's words, and confirmed by swapping the one component in.

Every check runs real fresh processes (forked from tensorparity's server), real training with
AdamW, LambdaLR, AveragedModel, a shuffled DataLoader, numpy and python RNG in the data pipeline."""

from __future__ import annotations

import json

import pytest
from resume_test_recipes import spec

from tensorparity.examples.resume_recipes import (
    AccumulatingRecipe,
    Forgetful,
    LoraRecipe,
    TinyDefaultRecipe,
    TinyRecipe,
)
from tensorparity.numerics import Tolerance
from tensorparity.resume import ResumeReport, resume_check

STEPS = 8  # 6 batches per epoch: step 3 is mid-epoch, step 6 the epoch boundary


@pytest.fixture(scope="module")
def correct() -> ResumeReport:
    return resume_check(TinyRecipe, steps=STEPS, resume_at=[3, 6])


def test_correct_recipe_passes_bitwise_mid_epoch_and_at_the_epoch_boundary(correct: ResumeReport) -> None:
    assert correct.verdict == "pass" and correct.exit_code == 0
    assert correct.profile == "bitwise" and correct.tolerance.exact
    assert [leg.points for leg in correct.legs] == [(3,), (6,)]
    assert correct.steps_per_epoch == 6
    for leg in correct.legs:
        (seg,) = leg.segments
        assert [r.step for r in seg.rows] == list(range(seg.start + 1, STEPS + 1))
        assert all(r.match and r.params_same for r in seg.rows)
        assert seg.findings == () and seg.end == () and leg.confirmations == ()
    # The boundary leg starts a new epoch on its first step, as the uninterrupted run did.
    assert (correct.legs[1].rows[0].epoch, correct.legs[1].rows[0].batch) == (1, 0)
    assert correct.checkpoint.startswith("the recipe's own")


def test_default_checkpoint_passes_a_sweep_in_one_call() -> None:
    report = resume_check(TinyDefaultRecipe, steps=STEPS, resume_at=[2, 5, 6], confirm=False)
    assert report.passed, report
    assert [leg.points for leg in report.legs] == [(2,), (5,), (6,)]
    assert "default" in report.checkpoint


def test_chained_resumes() -> None:
    report = resume_check(TinyRecipe, steps=STEPS, resume_at=[5, 2], chain=True, confirm=False)
    assert report.passed, report
    (leg,) = report.legs
    assert leg.points == (2, 5) and [(s.start, s.stop) for s in leg.segments] == [(2, 5), (5, 8)]
    assert "2 → 5" in leg.label


@pytest.mark.parametrize(("forget", "component", "words"), [
    ("optimizer", "optimizer", "optimizer state was not restored: exp_avg, exp_avg_sq and step of 22 parameters are "
                               "missing"),
    ("scheduler", "scheduler", "scheduler last_epoch is 0, expected 3"),
    ("torch_rng", "rng.torch", "torch CPU RNG state differs: dropout masks and the next epoch's shuffle will change"),
    ("progress", "data", "data loader restarted from the epoch start (batch 0 instead of batch 3): the batch at step "
                         "4 differs"),
    ("numpy_rng", "rng.numpy", "numpy global RNG state differs"),
    ("python_rng", "rng.python", "python random state differs"),
    ("strict", "model", "load_state_dict(strict=False) skipped 2 keys that differ from the uninterrupted run "
                        "(net.decoder.bias and net.decoder.weight): they keep their freshly built values"),
    ("ema", "extras.ema", "EMA weights (extras 'ema') were not restored: 23 of 24 tensors differ"),
])
def test_negative_control_is_detected_named_and_confirmed(forget: str, component: str, words: str) -> None:
    report = resume_check(Forgetful(forget=forget), steps=STEPS, resume_at=3)
    assert report.verdict == "resume bug" and report.exit_code == 1
    (leg,) = report.legs
    seg = leg.failing
    assert seg is not None and seg.divergence is not None
    # Named: exactly the forgotten component differs right after the load, in the user's words.
    assert [f.component for f in seg.findings] == [component], seg.findings
    assert words in seg.findings[0].message
    # Confirmed: taking that one component from the uninterrupted run makes the divergence disappear.
    assert seg.findings[0].confirmed is True
    assert [(c.components, c.passed, c.first_divergent_step) for c in leg.confirmations] == [((component,), True, None)]
    assert words in report.summary()


def test_first_divergence_names_the_step_and_the_tensor() -> None:
    report = resume_check(Forgetful(forget="torch_rng"), steps=STEPS, resume_at=3, confirm=False)
    seg = report.legs[0].failing
    assert seg is not None and seg.divergence is not None
    div = seg.divergence
    assert div.step == 4 and "loss" in div.what and "parameters" in div.what
    assert div.tensor == "net.pre_encode.weight"
    assert div.message.startswith("step 4 differs first: loss")
    # Dropout changes the loss at once; EMA only ever shows in the end state.
    ema = resume_check(Forgetful(forget="ema"), steps=STEPS, resume_at=3, confirm=False).legs[0].failing
    assert ema is not None and ema.divergence is not None
    assert ema.divergence.step is None and ema.divergence.what == ("final state",)
    assert all(r.match for r in ema.rows)


def test_adapter_only_checkpoint_loaded_with_strict_false_passes() -> None:
    report = resume_check(LoraRecipe, steps=STEPS, resume_at=3, confirm=False)
    assert report.passed, report
    (note,) = report.legs[0].segments[0].notes
    assert "strict=False) skipped 23 keys" in note and "nothing was lost" in note


def test_gradient_accumulation_resumed_inside_a_group() -> None:
    report = resume_check(AccumulatingRecipe, steps=STEPS, resume_at=[3, 4], confirm=False)
    assert report.passed, report
    assert report.accumulate == 2
    rows = report.legs[0].rows
    assert [r.step for r in rows][:2] == [4, 5]


def test_accumulated_gradients_not_saved_are_named() -> None:
    report = resume_check(spec("AccumulatingForgetsGrads"), steps=STEPS, resume_at=3)
    seg = report.legs[0].failing
    assert seg is not None
    assert [f.component for f in seg.findings] == ["grads"]
    assert "accumulated gradients were not restored: resumed inside an accumulation group (1 of 2 micro-batches " \
           "done)" in seg.findings[0].message
    assert seg.findings[0].confirmed is True
    # Resumed at a group boundary the same recipe is correct: there is nothing to accumulate yet.
    assert resume_check(spec("AccumulatingForgetsGrads"), steps=STEPS, resume_at=4, confirm=False).passed


def test_stateful_dataloader_default_and_forgotten() -> None:
    pytest.importorskip("torchdata.stateful_dataloader")
    assert resume_check(spec("StatefulLoader"), steps=STEPS, resume_at=[3, 6], confirm=False).passed
    report = resume_check(spec("StatefulForgetsLoader"), steps=STEPS, resume_at=3)
    seg = report.legs[0].failing
    assert seg is not None and [f.component for f in seg.findings] == ["data"]
    assert "the stateful data loader restarted from the epoch start (0 batches yielded; expected 3)" in \
        seg.findings[0].message
    assert seg.findings[0].confirmed is True


def test_dtype_tolerance_and_json(correct: ResumeReport) -> None:
    report = resume_check(TinyRecipe, steps=4, resume_at=2, tolerance="dtype", confirm=False)
    assert report.passed and report.profile == "dtype" and not report.tolerance.exact
    assert all(r.params_same is None for r in report.legs[0].rows)  # judged by the final state instead
    custom = resume_check(TinyRecipe, steps=4, resume_at=2, tolerance=Tolerance(atol=1e-6), confirm=False)
    assert custom.profile == "custom" and custom.passed
    data = json.loads(correct.to_json())
    assert data["schema"] == "tensorparity.resume/1" and data["verdict"] == "pass"
    assert data["legs"][0]["segments"][0]["steps"][0]["step"] == 4


def test_spawn_isolation_runs_every_leg_in_a_new_interpreter() -> None:
    # The optimizer-free recipe keeps each interpreter to `import torch`.
    report = resume_check(spec("ManualRecipe"), steps=5, resume_at=2, confirm=False, isolation="spawn")
    assert report.passed and report.isolation == "spawn"


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORPARITY_SECRET_SETTING", "1")
    assert resume_check(spec("EnvProbe"), steps=4, resume_at=2, confirm=False).passed
