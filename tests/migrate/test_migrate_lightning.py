"""A real Lightning checkpoint: its version read from ``pytorch-lightning_version``, migrated with a
mapping and a scheduler fix, the Lightning layout kept, the record a top-level value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tensorparity
from tensorparity.mapping import Mapping, Rule
from tensorparity.migrate import Migration, Registry, migrate, plan_migrations, recompute_last_epoch

lightning = pytest.importorskip("lightning")

from tensorparity.examples.lightning_run import train_lightning  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_lightning(tmp_path_factory.mktemp("lightning") / "run.ckpt", steps=2)


def registry() -> Registry:
    # The field belongs to Lightning: leave it as Lightning wrote it; our record says what ran.
    return Registry("my-project", [
        Migration("99.0", "rename-norm", mapping=Mapping([Rule("state_dict.model.final_norm.{p}",
                                                               "state_dict.model.norm.{p}")]), inverse="auto"),
        Migration("99.0.1", "scheduler-epoch", function=recompute_last_epoch(scheduler="lr_schedulers.0")),
    ], version_field="pytorch-lightning_version", set_version_field=False)


def test_lightning_version_field_and_layout_survive_a_migration(run: Path, tmp_path: Path) -> None:
    with tensorparity.open(run) as ckpt:
        plan = plan_migrations(ckpt, registry())
        assert plan.version == ckpt["pytorch-lightning_version"].value == lightning.__version__
        assert plan.version_origin == "field 'pytorch-lightning_version'"
        assert [s.name for s in plan.steps] == ["rename-norm", "scheduler-epoch"]
    report = migrate(run, registry(), output=tmp_path / "fixed.ckpt")
    assert report.verified and report.counts() == {"renamed": 2, "changed": 2}
    before = torch.load(run, weights_only=True)
    after = torch.load(tmp_path / "fixed.ckpt", weights_only=True)
    assert set(after) == set(before) | {"tensorparity_migrations"}
    assert after["pytorch-lightning_version"] == before["pytorch-lightning_version"]
    # (renamed keys come last in their dict: torch's load_state_dict does not mind the order)
    assert sorted(after["state_dict"]) == sorted(k.replace("model.final_norm.", "model.norm.")
                                                 for k in before["state_dict"])
    assert after["lr_schedulers"][0]["last_epoch"] == after["global_step"] == 2
    assert after["loops"] == before["loops"] and after["hyper_parameters"] == before["hyper_parameters"]
    assert torch.equal(after["optimizer_states"][0]["state"][0]["exp_avg"],
                       before["optimizer_states"][0]["state"][0]["exp_avg"])
    record = json.loads(after["tensorparity_migrations"])["history"][-1]
    assert record["registry"] == "my-project" and record["source"]["format"] == "lightning"
    with tensorparity.open(tmp_path / "fixed.ckpt") as fixed:
        assert fixed.format == "lightning" and fixed.section_of("state_dict.model.norm.weight") == "model"
    assert migrate(tmp_path / "fixed.ckpt", registry()).verdict == "up to date"
