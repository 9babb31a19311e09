"""A real ``lightning.Trainer`` run, saved at step K (``trainer.save_checkpoint`` in
``on_train_batch_end``, as ``ModelCheckpoint`` saves) and resumed in a fresh process with
``Trainer.fit(ckpt_path=...)``: what Lightning restores, what it does not, and how the report
names it. 8 samples in batches of 2: 4 steps per epoch, so step 3 is mid-epoch and step 4 the
epoch boundary. The factories below are what the fresh processes import."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorparity.errors import UsageError
from tensorparity.integrations.lightning import lightning_resume_check
from tensorparity.pytest_plugin import assert_lightning_resumes
from tensorparity.resume import RecipeError, ResumeReport, rng_state, set_rng_state

L = pytest.importorskip("lightning.pytorch")
STEPS = 8


class Tiny(L.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(p), nn.Tanh(), nn.Linear(4, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


class TinyKeepsRng(Tiny):
    """Puts the global RNG states into its checkpoint (Lightning's holds none) and back."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        set_rng_state(checkpoint["rng"])


def tiny() -> Tiny:
    return Tiny()


def tiny_dropout() -> Tiny:
    return Tiny(p=0.3)


def tiny_keeps_rng() -> Tiny:
    return TinyKeepsRng()


def not_a_module() -> nn.Module:
    return nn.Linear(3, 1)


def _dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))


def shuffled() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_dataset(), batch_size=2, shuffle=True)


def stateful() -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(_dataset(), batch_size=2, shuffle=True)


def _findings(report: ResumeReport, index: int) -> dict[str, Any]:
    return {f.component: f for f in report.legs[index].segments[0].findings}


def test_plain_shuffled_dataloader_mid_epoch_and_at_the_epoch_boundary() -> None:
    report = lightning_resume_check(tiny, shuffled, steps=STEPS, resume_at=[3, 4])
    assert report.verdict == "resume bug" and report.steps_per_epoch == 4
    assert "ModelCheckpoint" in report.checkpoint and "ckpt_path" in report.checkpoint
    mid, boundary = report.legs
    # Mid-epoch: Lightning restores its loop counters (batch_idx 3), but a plain DataLoader starts a
    # new pass: the resumed run trains step 1's batch again at step 4.
    (data,) = _findings(report, 0).values()
    assert data.component == "data" and data.confirmed is True
    assert data.message == ("data loader restarted from the epoch start (batch 0 instead of batch 3): the batch at "
                            "step 4 differs (it is the batch of step 1)")
    assert mid.failing is not None and mid.failing.divergence is not None
    assert mid.failing.divergence.step == 4 and mid.rows[0].batch_b_from == 1
    # Lightning ends the epoch after the 1 batch its counters have left; the re-shuffled pass
    # repeats epoch 0's order, so epoch 1 (drawn from the same number of RNG calls) is right again.
    assert all(r.batch_same for r in mid.rows[1:])
    # At the boundary the counters are right, but no RNG state is in Lightning's checkpoint: the
    # fresh process shuffles epoch 1 from the state epoch 0 was shuffled from.
    found = _findings(report, 1)
    assert set(found) == {"data", "rng.torch"}
    assert found["data"].message.startswith("the RNG states the epoch's shuffle was drawn from differ")
    assert found["data"].confirmed is True and found["rng.torch"].confirmed is False
    assert [r.batch_b_from for r in boundary.rows] == [1, 2, 3, 4]
    assert "(the resumed run got step 1's)" in boundary.diagnosis()


def test_stateful_dataloader_resumes_mid_epoch_bitwise() -> None:
    pytest.importorskip("torchdata.stateful_dataloader")
    report = lightning_resume_check(tiny, stateful, steps=STEPS, resume_at=[3, 4], confirm=False)
    mid, boundary = report.legs
    assert mid.passed and mid.segments[0].findings == () and mid.segments[0].end == ()
    assert all(r.match and r.params_same for r in mid.rows)
    # At the boundary every step matches bitwise too, but Lightning counts one epoch more: the
    # restored loader's pass is exhausted, so an empty epoch 1 goes by before epoch 2.
    assert all(r.match and r.params_same for r in boundary.rows)
    assert [r.epoch_b for r in boundary.rows] == [2, 2, 2, 2] and [r.epoch for r in boundary.rows] == [1, 1, 1, 1]
    (data,) = _findings(report, 1).values()
    assert data.message.startswith("the epoch counter is 2, expected 1, at the same position in the data")
    assert boundary.failing is not None and boundary.failing.divergence is not None
    assert boundary.failing.divergence.step is None  # only the state differs


def test_rng_kept_in_the_checkpoint_resumes_at_the_epoch_boundary_bitwise() -> None:
    report = assert_lightning_resumes(tiny_keeps_rng, shuffled, steps=STEPS, resume_at=4, confirm=False)
    assert report.passed and report.profile == "bitwise"
    assert all(r.params_same for r in report.legs[0].rows)


def test_dropout_masks_change_because_the_torch_rng_is_not_restored() -> None:
    pytest.importorskip("torchdata.stateful_dataloader")
    report = lightning_resume_check(tiny_dropout, stateful, steps=STEPS, resume_at=3)
    (rng,) = _findings(report, 0).values()
    assert rng.component == "rng.torch" and rng.message == "torch CPU RNG state differs: dropout masks will change"
    assert rng.confirmed is True
    seg = report.legs[0].failing
    assert seg is not None and seg.divergence is not None and seg.divergence.step == 4
    assert seg.rows[0].batch_same and not seg.rows[0].loss_same


def test_checkpoint_saved_after_fit_returned_skips_the_rest_of_the_epoch() -> None:
    pytest.importorskip("torchdata.stateful_dataloader")
    report = lightning_resume_check(tiny, stateful, steps=STEPS, resume_at=3, save="after_fit", confirm=False)
    assert "after fit(max_steps=K) returned" in report.checkpoint
    (data,) = _findings(report, 0).values()
    assert data.message.startswith("data position differs (epoch 1, batch 0 instead of epoch 0, batch 3)")
    assert report.legs[0].rows[0].batch_b_from == 5  # epoch 1's first batch, a step early


@pytest.mark.parametrize(("options", "needle"), [
    ({"trainer": {"max_epochs": 3}}, "'max_epochs' is set by the check"),
    ({"trainer": {"gradient_clip": 1.0}}, "lightning.Trainer has no option(s) 'gradient_clip'"),
    ({"trainer": {"accumulate_grad_batches": 2}}, "accumulate_grad_batches must be 1"),
    ({"chain": True, "resume_at": [2, 4]}, "chain=True is not supported for Lightning runs"),
    ({"save": "epoch_end"}, "save must be 'callback' or 'after_fit'"),
    ({"resume_at": 8}, "resume point(s) 8 not between 1 and steps - 1 = 7"),
])
def test_bad_options(options: dict[str, Any], needle: str) -> None:
    kwargs: dict[str, Any] = {"steps": STEPS, "resume_at": 3, **options}
    with pytest.raises(UsageError) as info:
        lightning_resume_check(tiny, shuffled, **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_factories() -> None:
    def local() -> Tiny:
        return Tiny()

    with pytest.raises(UsageError, match="defined inside a function"):
        lightning_resume_check(local, shuffled, steps=STEPS, resume_at=3)
    with pytest.raises(UsageError, match="must be given as a factory"):
        lightning_resume_check(Tiny(), shuffled, steps=STEPS, resume_at=3)
    with pytest.raises(UsageError, match="has no attribute 'nope'"):
        lightning_resume_check(f"{__file__}:nope", shuffled, steps=STEPS, resume_at=3)
    with pytest.raises(RecipeError, match="the model factory returned a Linear, not a LightningModule"):
        lightning_resume_check(not_a_module, shuffled, steps=STEPS, resume_at=3, confirm=False)
