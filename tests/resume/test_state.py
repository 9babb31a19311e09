"""The building blocks, in one process: state capture/restore, fingerprints, recipe names,
the audit's words and the confirmation logic."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from resume_test_recipes import HERE, ManualRecipe, spec

from tensorparity.examples.resume_recipes import Forgetful, TinyRecipe
from tensorparity.numerics import Tolerance
from tensorparity.resume import TrainingObjects, rng_state, set_rng_state
from tensorparity.resume._recipe_errors import RecipeError
from tensorparity.resume._resume_report import Finding, Segment, StepRow
from tensorparity.resume.audit import audit, state_diff
from tensorparity.resume.confirm import conclude, plan
from tensorparity.resume.fingerprint import StepRecord, compare_records, hash_batch
from tensorparity.resume.recipe import RecipeSpec, as_objects, load_recipe, resolve, spec_of
from tensorparity.resume.state import capture, load, restore, save


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # numpy state stored without numpy arrays
    assert _draws() == expected


def test_default_save_load_restores_everything(tmp_path) -> None:
    def objs(seed: int) -> TrainingObjects:
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return TrainingObjects(model=model, dataloader=[], optimizer=opt,
                               scheduler=torch.optim.lr_scheduler.StepLR(opt, 2),
                               extras={"gen": torch.Generator().manual_seed(seed), "np": np.random.default_rng(seed),
                                       "py": random.Random(seed)})

    a = objs(0)
    a.model(torch.randn(4, 3)).sum().backward()
    a.optimizer.step(), a.scheduler.step()
    a.extras["gen"].seed(), a.extras["np"].random(), a.extras["py"].random()
    a.progress.step = 3
    save(a, tmp_path / "ckpt.pt", inside_group=True)
    b = objs(1)
    load(b, tmp_path / "ckpt.pt")
    report = state_diff(capture(a, inside_group=True), capture(b, inside_group=True), tolerance=Tolerance(exact=True))
    assert report.verdict == "identical", report.summary()
    assert b.progress.step == 3 and b.model.weight.grad is not None
    assert a.extras["np"].random() == b.extras["np"].random()


def test_restore_only_one_component() -> None:
    a = TrainingObjects(model=torch.nn.Linear(2, 2), dataloader=[])
    b = TrainingObjects(model=torch.nn.Linear(2, 2), dataloader=[])
    state = capture(a)
    torch.rand(5)
    restore(b, state, only=["rng.torch"])
    assert not torch.equal(a.model.weight, b.model.weight)
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    with pytest.raises(RecipeError, match="the saved state has no 'optimizer'"):
        restore(TrainingObjects(model=torch.nn.Linear(2, 2), dataloader=[],
                                optimizer=torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1)), state)


def test_capturing_a_stateful_loader_does_not_draw_from_the_rng() -> None:
    tdl = pytest.importorskip("torchdata.stateful_dataloader")
    loader = tdl.StatefulDataLoader(torch.arange(8), batch_size=2, shuffle=True)
    objs = TrainingObjects(model=torch.nn.Linear(1, 1), dataloader=loader)
    before = torch.get_rng_state()
    state = capture(objs)
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(state["rng"]["torch"], before)


def test_hashes_and_step_comparison() -> None:
    assert hash_batch((torch.ones(2), {"id": 3})) == hash_batch((torch.ones(2), {"id": 3}))
    assert hash_batch(torch.ones(2)) != hash_batch(torch.ones(2, dtype=torch.float64))
    a = [StepRecord(1, 0, 0, "x", 0.5, tensors={"w": "1"}), StepRecord(2, 0, 1, "y", 0.4, tensors={"w": "2"})]
    b = [StepRecord(2, 0, 0, "x", 0.4000001, tensors={"w": "3"})]
    (row,) = compare_records(a, b, Tolerance(exact=True))
    assert (row.step, row.batch_same, row.batch_b_from, row.loss_same, row.params_same) == (2, False, 1, False, False)
    assert row.differences() == ("batch", "loss", "parameters")
    (loose,) = compare_records(a, b, Tolerance())
    assert loose.loss_same and loose.params_same is None


def test_recipe_names() -> None:
    assert spec_of(Forgetful(forget="ema")).kwargs == {"forget": "ema"}
    assert spec_of(TinyRecipe).text == "tensorparity.examples.resume_recipes:TinyRecipe"
    assert spec_of(spec("ManualRecipe")).text == f"{HERE}:ManualRecipe"
    assert spec_of(ManualRecipe).text.endswith(":ManualRecipe")
    with pytest.raises(RecipeError, match="cannot be re-created in a fresh process"):
        spec_of(ManualRecipe())
    loaded = load_recipe(Forgetful(forget="ema"))
    assert loaded.own_checkpoint and loaded.accumulate == 1
    with pytest.raises(RecipeError, match="NoisyFeatures is not a usable recipe: it has no build"):
        load_recipe("tensorparity.examples.resume_recipes:NoisyFeatures")
    with pytest.raises(RecipeError, match="creating the recipe raised ValueError: forget must be one of"):
        resolve(RecipeSpec("tensorparity.examples.resume_recipes:Forgetful", kwargs={"forget": "everything"}))
    with pytest.raises(RecipeError, match="unknown key"):
        as_objects({"model": torch.nn.Linear(1, 1), "dataloader": [], "ema": object()}, where="r")
    with pytest.raises(RecipeError, match="no 'dataloader'"):
        as_objects({"model": torch.nn.Linear(1, 1)}, where="r")


def _row(step: int, batch_same: bool = True) -> StepRow:
    return StepRow(step, 0, step - 1, 0, 0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, batch_same, True, True, True)


def test_audit_words_for_each_component() -> None:
    ref = {"model": {"w": torch.ones(2), "b": torch.zeros(1)}, "mode": {"training": True},
           "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}, 1: {"exp_avg": torch.ones(1)}},
                         "param_groups": [{"lr": 0.003, "params": [0, 1]}]},
           "scaler": {"scale": 32768.0}, "extras": {"ema": {"w": torch.ones(2)}},
           "grads": {"w": torch.ones(2)}, "data": {"progress": {"epoch": 1, "batch_in_epoch": 2, "step": 8}},
           "rng": {"numpy": {"keys": torch.arange(3)}, "python": {"state": torch.arange(3)}}}
    got = {"model": {"w": torch.full((2,), 2.0), "b": torch.zeros(1)}, "mode": {"training": False},
           "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}, 1: {"exp_avg": torch.zeros(1)}},
                         "param_groups": [{"lr": 0.0006000000000000001, "params": [0, 1]}]},
           "scaler": {"scale": 65536.0}, "extras": {"ema": {"w": torch.zeros(2)}},
           "grads": {}, "data": {"progress": {"epoch": 0, "batch_in_epoch": 0, "step": 8}},
           "rng": {"numpy": {"keys": torch.arange(3) + 1}, "python": {"state": torch.arange(3) + 1}}}
    findings, notes = audit(state_diff(ref, got, tolerance=Tolerance(exact=True)), at=5, accumulate=2,
                            meta={"extras": {"ema": "AveragedModel"}}, rows=[_row(6, batch_same=False)])
    words = {f.component: f.message for f in findings}
    assert words["model"] == "model weights were not restored: 1 of 2 tensors differ (first: w)"
    assert words["mode"].startswith("the model is in eval mode, the uninterrupted run's in train mode")
    assert words["optimizer"] == ("optimizer state was not restored: exp_avg of 1 parameter differs; param group 0 lr "
                                  "is 0.0006, expected 0.003")
    assert words["scaler"] == "grad scaler state was not restored: scale is 65536, expected 32768"
    assert words["extras.ema"].startswith("EMA weights (extras 'ema') were not restored: 1 of 1 tensor differ")
    assert words["grads"].startswith("accumulated gradients were not restored: resumed inside an accumulation group "
                                     "(1 of 2 micro-batches done)")
    assert words["data"] == ("data loader restarted from the first epoch (epoch 0, batch 0 instead of epoch 1, batch "
                             "2): the batch at step 6 differs")
    assert words["rng.numpy"].startswith("numpy global RNG state differs")
    assert words["rng.python"].startswith("python random state differs")
    assert list(words) == ["model", "mode", "optimizer", "scaler", "extras.ema", "grads", "data", "rng.numpy",
                           "rng.python"]
    assert notes == ()


def test_confirmation_logic() -> None:
    ok, bad = Segment(3, 8, (), (), (), None), Segment(3, 8, (_row(4),), (), (), None)
    findings = [Finding("optimizer", "a", 3), Finding("scheduler", "b", 3)]
    assert plan(findings) == [("optimizer",), ("scheduler",), ("optimizer", "scheduler")]
    from tensorparity.resume._resume_report import Divergence

    failed = Segment(3, 8, (), (), (), Divergence(5, ("loss",), None, "step 5 differs first: loss"))
    confirmations, marked = conclude([(("optimizer",), failed), (("scheduler",), failed),
                                      (("optimizer", "scheduler"), ok)], findings)
    assert [c.passed for c in confirmations] == [False, False, True]
    assert [f.confirmed for f in marked] == [True, True]  # only together
    assert "is not enough: step 5 differs first" in confirmations[0].message
    _, marked = conclude([(("optimizer",), ok), (("scheduler",), failed)], findings)
    assert [f.confirmed for f in marked] == [True, False]
    assert bad.passed


def test_non_persistent_buffers_are_captured_and_restored(tmp_path) -> None:
    def objs(fill: float) -> TrainingObjects:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        model[0].register_buffer("stats", torch.full((2,), fill), persistent=False)
        return TrainingObjects(model=model, dataloader=[])

    a, b = objs(3.0), objs(0.0)
    assert "stats" not in "".join(a.model.state_dict())  # what a state_dict() checkpoint misses
    state = capture(a)
    assert list(state["buffers"]) == ["0.stats"]
    findings, _ = audit(state_diff(state, capture(b), tolerance=Tolerance(exact=True)), at=2)
    assert [f.component for f in findings] == ["model", "buffers"]
    assert findings[1].message.startswith("non-persistent buffer 0.stats differs from the uninterrupted run's: "
                                          "registered with persistent=False")
    restore(b, state, only=["buffers"])
    assert torch.equal(b.model[0].stats, a.model[0].stats)
    # The default checkpoint is everything stateful: it carries them too.
    c = objs(0.0)
    save(a, tmp_path / "ckpt.pt")
    load(c, tmp_path / "ckpt.pt")
    assert torch.equal(c.model[0].stats, torch.full((2,), 3.0))
    assert "buffers" not in capture(TrainingObjects(model=torch.nn.Linear(1, 1), dataloader=[]))
