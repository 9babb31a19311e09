"""Version detection (a checkpoint field, a NeMo config field, safetensors metadata, tensorparity's own
record, --from, default_version) and the plan: ordered upgrades, downgrades only through inverses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tensorparity
from tensorparity.examples.formats import write_nemo
from tensorparity.mapping import Mapping, Rule
from tensorparity.migrate import DowngradeError, Migration, MigrationError, Registry, migrate, plan_migrations

STATE = {"enc.w": torch.arange(6.0).reshape(2, 3), "dec.w": torch.ones(3)}


def registry(*, field: str | tuple[str, ...] = "release", inverses: bool = True, **options: object) -> Registry:
    inv = "auto" if inverses else None
    return Registry("demo", [
        Migration("1.5", "rename-dec", mapping=Mapping([Rule("{s*}dec.w", "{s*}head.w")]), inverse=inv),
        Migration("2.0", "rename-enc", mapping=Mapping([Rule("{s*}enc.w", "{s*}encoder.w")]), inverse=inv),
    ], version_field=field, **options)  # type: ignore[arg-type]


def training_ckpt(tmp_path: Path, release: object = "1.0") -> Path:
    path = tmp_path / "run.pt"
    torch.save({"release": release, "model": STATE, "epoch": 1}, path)
    return path


def test_version_from_a_field_and_the_ordered_plan(tmp_path: Path) -> None:
    plan = plan_migrations(tensorparity.open(training_ckpt(tmp_path)), registry())
    assert (plan.version, plan.version_origin, plan.target, plan.direction) == ("1.0", "field 'release'", "2.0", "up")
    assert [(s.name, s.version, s.direction) for s in plan.steps] == [("rename-dec", "1.5", "up"),
                                                                       ("rename-enc", "2.0", "up")]
    assert plan.summary() == "1.0 -> 2.0: 2 migrations (rename-dec 1.5, rename-enc 2.0)"
    assert plan.to_dict()["schema"] == "tensorparity.migration-plan/1"
    mid = plan_migrations(tensorparity.open(training_ckpt(tmp_path, "1.5")), registry())
    assert [s.name for s in mid.steps] == ["rename-enc"]
    now = plan_migrations(tensorparity.open(training_ckpt(tmp_path, "2.0.0")), registry())
    assert now.up_to_date and now.summary() == "already at 2.0: nothing to do"


def test_version_from_a_nemo_config_field(tmp_path: Path) -> None:
    path = write_nemo(tmp_path / "m.nemo", STATE, {"target": "demo.Model", "release": "1.5"})
    plan = plan_migrations(tensorparity.open(path), registry(field="model_config.release"))
    assert plan.version == "1.5" and plan.version_origin == "field 'model_config.release'"
    assert [s.name for s in plan.steps] == ["rename-enc"]


def test_version_from_safetensors_metadata_and_fields_tried_in_order(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(STATE, str(path), metadata={"release": "1.5"})
    plan = plan_migrations(tensorparity.open(path), registry(field=("version", "release")))
    assert (plan.version, plan.version_origin) == ("1.5", "metadata 'release'")


def test_the_record_of_a_previous_run_wins_over_the_field(tmp_path: Path) -> None:
    path = training_ckpt(tmp_path)
    migrate(path, registry(set_version_field=False), output=tmp_path / "out.pt")
    with tensorparity.open(tmp_path / "out.pt") as out:
        assert out["release"].value == "1.0"  # the field was left alone on purpose
        plan = plan_migrations(out, registry())
    assert plan.up_to_date and plan.version_origin == "tensorparity's record of the last migration"
    assert plan.history[-1]["registry"] == "demo" and plan.history[-1]["to"] == "2.0"
    with tensorparity.open(tmp_path / "out.pt") as out:  # another registry's record does not count
        other = plan_migrations(out, Registry("other", registry().migrations, version_field="release"))
    assert other.version == "1.0"


def test_no_version_needs_from_or_a_default(tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(STATE, bare)
    with pytest.raises(MigrationError, match=r"records no version: none of 'release' is in it.*fix: state its "
                                             r"version with --from VERSION"):
        plan_migrations(tensorparity.open(bare), registry())
    stated = plan_migrations(tensorparity.open(bare), registry(), from_version="1.5")
    assert stated.version_origin == "stated (--from)" and [s.name for s in stated.steps] == ["rename-enc"]
    default = plan_migrations(tensorparity.open(bare), registry(default_version="1.0"))
    assert default.version == "1.0" and "default_version" in default.version_origin


def test_bad_version_fields_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match=r"\[release\]: version field 'release' must be a version string"):
        plan_migrations(tensorparity.open(training_ckpt(tmp_path, [1, 0])), registry())
    torch.save({"release": torch.ones(1), "model": STATE, "epoch": 1}, tmp_path / "t.pt")
    with pytest.raises(MigrationError, match="holds a tensor, not a version"):
        plan_migrations(tensorparity.open(tmp_path / "t.pt"), registry())


def test_downgrade_goes_through_inverses_newest_first(tmp_path: Path) -> None:
    plan = plan_migrations(tensorparity.open(training_ckpt(tmp_path, "2.0")), registry(), target="1.0")
    assert plan.direction == "down"
    assert [(s.name, s.version, s.direction) for s in plan.steps] == [("undo rename-enc", "2.0", "down"),
                                                                       ("undo rename-dec", "1.5", "down")]
    assert "downgrade, through inverses" in plan.summary()


def test_downgrade_without_an_inverse_is_refused(tmp_path: Path) -> None:
    ckpt = tensorparity.open(training_ckpt(tmp_path, "2.0"))
    with pytest.raises(DowngradeError, match=r"newer than the target 1.0; going down needs the inverse of "
                                             r"'rename-dec' \(1.5\), 'rename-enc' \(2.0\), which are not defined"):
        plan_migrations(ckpt, registry(inverses=False), target="1.0")


def test_a_checkpoint_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    ckpt = tensorparity.open(training_ckpt(tmp_path, "3.1"))
    with pytest.raises(DowngradeError, match=r"at version 3.1, newer than every migration this code knows "
                                             r"\(the newest is 2.0\); refusing to downgrade it to 2.0"):
        plan_migrations(ckpt, registry())
