"""migrate(): the old release of the example model upgraded (dry run, in place, diffed against the
current layout), the record inside the output, second runs that do nothing, the record's place per
format, tied weights and moves, downgrades through inverses, and conflicts found before any write."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tensorparity
from tensorparity.errors import UsageError
from tensorparity.examples import old_release, reference_model
from tensorparity.examples.formats import artifact_name, write_nemo
from tensorparity.mapping import Mapping, Rule
from tensorparity.migrate import (
    ConflictError,
    Migration,
    Registry,
    migrate,
    move_keys,
    read_history,
    tie_weights,
)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def old(tmp_path: Path) -> Path:
    return old_release.write_old_release(tmp_path / "run_v1.pt")


def test_dry_run_lists_every_change_and_writes_nothing(old: Path) -> None:
    before = listing(old.parent)
    report = migrate(old, old_release.SPEC, dry_run=True)
    assert listing(old.parent) == before
    assert report.verdict == "dry run" and report.output is None and report.verification is None
    assert report.counts() == {"renamed": 2, "transformed": 12, "changed": 3}
    texts = {c.text() for c in report.changes}
    assert "model.frontend.conv.weight -> model.pre_encode.weight" in texts
    assert "scheduler.last_epoch  (0 -> 3)" in texts and "release  ('1.0' -> '2.0')" in texts
    split = [c for c in report.changes if c.key == "model.layers.1.self_attn.v_proj.weight"]
    assert split[0].sources == ("model.layers.1.self_attn.qkv.weight",) and "split" in split[0].detail
    assert str(report).startswith("dry run: 1.0 -> 2.0 through 3 migrations: 2 renamed, 12 transformed, 3 changed; "
                                  "nothing was written")


def test_in_place_with_backup_then_diff_against_the_current_layout(old: Path) -> None:
    original = sha(old)
    report = migrate(old, old_release.SPEC, in_place=True, backup=True)
    assert report.verdict == "migrated" and report.verified is True and report.in_place
    assert report.output == str(old) and sha(Path(str(old) + ".bak")) == original != sha(old)
    assert (report.untouched, report.made) == (141, 12)
    # The upgraded weights are the current model's, bit for bit.
    assert tensorparity.diff(old, reference_model().state_dict()).verdict == "identical"
    # Untouched sections (the optimizer) are bitwise the original's.
    optimizer = tensorparity.diff(Path(str(old) + ".bak"), old, include=r"^optimizer\.", weights_only=False)
    with tensorparity.open(Path(str(old) + ".bak")) as original_ckpt:
        n_optimizer = sum(1 for e in original_ckpt.tensors() if e.key.startswith("optimizer."))
    assert optimizer.verdict == "identical" and len(optimizer.tensors) == n_optimizer > 100
    # A plain torch.load reads it, nested as before, with the recomputed scheduler and the record.
    loaded = torch.load(old, weights_only=True)
    assert set(loaded) == {"release", "model", "optimizer", "scheduler", "global_step", "epoch",
                           "tensorparity_migrations"}
    assert loaded["release"] == "2.0" and loaded["scheduler"]["last_epoch"] == 3
    assert reference_model().load_state_dict(loaded["model"], strict=True) is not None
    history = json.loads(loaded["tensorparity_migrations"])["history"]
    assert [m["name"] for m in history[0]["migrations"]] == ["rename-front-end", "split-qkv", "scheduler-epoch"]
    assert history[0]["source"]["sha256"] == original and history[0]["from"] == "1.0"
    # Nothing left beside it but the backup.
    assert sorted(p.name for p in old.parent.iterdir()) == ["run_v1.pt", "run_v1.pt.bak"]


def test_a_second_run_is_a_no_op(old: Path) -> None:
    migrate(old, old_release.SPEC, in_place=True)
    after = sha(old)
    again = migrate(old, old_release.SPEC, in_place=True)
    assert again.verdict == "up to date" and again.output is None and sha(old) == after
    assert again.summary() == f"up to date: {old} is already at 2.0, nothing was written"
    assert again.plan.version_origin == "tensorparity's record of the last migration"


def test_yaml_and_python_migrations_write_the_same_checkpoint(old: Path, tmp_path: Path) -> None:
    from_yaml = migrate(old, old_release.SPEC)
    assert from_yaml.output == str(tmp_path / "run_v1_fixed.pt")  # the default output
    migrate(old, old_release.MIGRATIONS, output=tmp_path / "py.pt")
    same = tensorparity.diff(tmp_path / "run_v1_fixed.pt", tmp_path / "py.pt", exclude="tensorparity_migrations",
                             weights_only=False)
    assert same.verdict == "identical"
    with pytest.raises(UsageError, match="the output file exists; fix: pass --overwrite to replace it, or choose another path"):
        migrate(old, old_release.SPEC)
    assert migrate(old, old_release.SPEC, overwrite=True).verified


def test_output_refusals(old: Path) -> None:
    with pytest.raises(UsageError, match="the output is the input itself; fix: pass --in-place"):
        migrate(old, old_release.SPEC, output=old)
    with pytest.raises(UsageError, match="a backup is kept only when migrating in place"):
        migrate(old, old_release.SPEC, backup=True)
    with pytest.raises(UsageError, match="--in-place and -o/--output both"):
        migrate(old, old_release.SPEC, in_place=True, output=old.with_name("x.pt"))
    with pytest.raises(UsageError, match="only a checkpoint on disk can be migrated in place"):
        migrate(torch.load(old, weights_only=True), old_release.SPEC, in_place=True)


def rename_registry(**options: object) -> Registry:
    return Registry("demo", [Migration("2.0", "rename", mapping=Mapping([Rule("decoder.{p}", "head.{p}")]),
                                       inverse="auto")], **options)  # type: ignore[arg-type]


def test_a_bare_state_dict_keeps_its_keys_and_records_in_the_zip(tmp_path: Path) -> None:
    state = {"decoder.weight": torch.randn(4, 3), "decoder.bias": torch.zeros(4)}
    torch.save(state, tmp_path / "w.pt")
    report = migrate(tmp_path / "w.pt", rename_registry(), from_version="1.0")
    loaded = torch.load(report.output, weights_only=True)
    assert set(loaded) == {"head.weight", "head.bias"}  # no record key to break load_state_dict
    with tensorparity.open(report.output) as out:
        assert read_history(out)[0]["to"] == "2.0"
    assert migrate(report.output, rename_registry()).verdict == "up to date"


def test_safetensors_records_in_its_header_and_updates_the_version(tmp_path: Path) -> None:
    save_file({"decoder.weight": torch.randn(4, 3)}, str(tmp_path / "w.safetensors"), metadata={"release": "1.0"})
    report = migrate(tmp_path / "w.safetensors", rename_registry(version_field="release"))
    assert report.format == "safetensors" and report.output.endswith("w_fixed.safetensors")
    with safe_open(report.output, "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["head.weight"]
    assert meta["release"] == "2.0" and json.loads(meta["tensorparity.migrations"])["history"][0]["from"] == "1.0"
    assert migrate(report.output, rename_registry(version_field="release")).verdict == "up to date"


def test_downgrade_through_inverses_restores_the_original(tmp_path: Path) -> None:
    state = {"decoder.weight": torch.randn(4, 3), "encoder.weight": torch.randn(3, 3)}
    torch.save({"release": "1.0", "model": state, "epoch": 2}, tmp_path / "run.pt")
    reg = Registry("demo", [Migration("2.0", "rename", mapping=Mapping([Rule("model.decoder.{p}", "model.head.{p}")]),
                                      inverse="auto")], version_field="release")
    up = migrate(tmp_path / "run.pt", reg)
    down = migrate(up.output, reg, target="1.0", output=tmp_path / "back.pt")
    assert down.plan.direction == "down" and down.verified
    back = tensorparity.diff(tmp_path / "run.pt", tmp_path / "back.pt", weights_only=False)
    assert back.verdict == "identical" and back.tensors and not back.only_in_b
    assert "tensorparity's migration record in B left out (--include-records" in " ".join(back.notes)
    records = tensorparity.diff(tmp_path / "run.pt", tmp_path / "back.pt", weights_only=False, include_records=True)
    assert [k.key for k in records.only_in_b] == ["tensorparity_migrations"] and all(
        t.status == "identical" for t in records.tensors)
    with tensorparity.open(tmp_path / "back.pt") as b:
        assert [(h["from"], h["to"], h["direction"]) for h in read_history(b)] == [("1.0", "2.0", "up"),
                                                                                   ("2.0", "1.0", "down")]


def test_tied_weights_and_a_move_into_another_section(tmp_path: Path) -> None:
    embed = torch.randn(5, 2)
    torch.save({"release": "1.0", "model": {"embed.weight": embed, "ema.shadow": torch.ones(2)},
                "ema_state": {"decay": 0.99}, "epoch": 0}, tmp_path / "run.pt")
    reg = Registry("demo", [
        Migration("2.0", "tie-head", function=tie_weights({"model.head.weight": "model.embed.weight"})),
        Migration("2.0", "ema-section", function=move_keys({"model.ema": "ema_state"})),
    ], version_field="release")
    report = migrate(tmp_path / "run.pt", reg)
    assert report.counts() == {"renamed": 1, "copied": 1, "changed": 1}
    loaded = torch.load(report.output, weights_only=True)
    assert torch.equal(loaded["model"]["head.weight"], embed) and "ema.shadow" not in loaded["model"]
    assert loaded["model"]["head.weight"].data_ptr() == loaded["model"]["embed.weight"].data_ptr()  # tied, once
    assert loaded["ema_state"]["decay"] == 0.99 and torch.equal(loaded["ema_state"]["shadow"], torch.ones(2))
    assert report.made == 0  # a tie and a move keep the source's bytes: verified against the source


def test_conflicting_migrations_are_reported_before_any_write(tmp_path: Path) -> None:
    torch.save({"release": "1.0", "model": {"dec.w": torch.ones(2)}, "epoch": 3}, tmp_path / "run.pt")
    before = listing(tmp_path)
    reg = Registry("demo", [
        Migration("2.0", "rename-dec", mapping=Mapping([Rule("model.dec.w", "model.head.w")])),
        Migration("2.0", "drop-dec", function=lambda tree: tree.delete("model.dec.w")),
        Migration("2.0", "epoch-a", function=lambda tree: tree.set("epoch", 0)),
        Migration("2.0", "epoch-b", function=lambda tree: tree.set("epoch", 1)),
    ], version_field="release")
    with pytest.raises(ConflictError) as info:
        migrate(tmp_path / "run.pt", reg, in_place=True)
    text = str(info.value)
    assert "conflicting migrations of version 2.0: 'rename-dec' and 'drop-dec' both write 'model.dec.w'" in text
    assert "'epoch-a' and 'epoch-b' both write 'epoch'" in text and "nothing was written" in text
    assert listing(tmp_path) == before
    # Across versions the order is defined: a later migration may rewrite what an earlier one wrote.
    ordered = Registry("demo", [Migration("1.5", "epoch-a", function=lambda tree: tree.set("epoch", 0)),
                                Migration("2.0", "epoch-b", function=lambda tree: tree.set("epoch", 1))],
                       version_field="release")
    assert torch.load(migrate(tmp_path / "run.pt", ordered).output, weights_only=True)["epoch"] == 1


def test_a_mapping_that_lands_on_an_existing_key_is_a_conflict(tmp_path: Path) -> None:
    torch.save({"release": "1.0", "model": {"dec.w": torch.ones(2), "head.w": torch.zeros(2)}}, tmp_path / "run.pt")
    reg = Registry("demo", [Migration("2.0", "rename", mapping=Mapping([Rule("model.dec.w", "model.head.w")]))],
                   version_field="release")
    with pytest.raises(tensorparity.TensorParityError, match="'model.head.w' is produced twice"):
        migrate(tmp_path / "run.pt", reg)
    assert not (tmp_path / "run_fixed.pt").exists()


def test_a_nemo_keeps_plain_weights_its_artifacts_and_records_beside_its_config(tmp_path: Path) -> None:
    import tarfile

    import yaml

    path = write_nemo(tmp_path / "m.nemo", {"decoder.weight": torch.randn(4, 3)},
                      {"target": "demo.Model", "release": "1.0", "optim": {"lr": 0.1}},
                      artifacts={"tokenizer.model": b"vocab"})
    reg = Registry("demo", [Migration("2.0", "rename", mapping=Mapping([Rule("decoder.{p}", "head.{p}")]),
                                      function=lambda tree: tree.set("model_config.optim.lr", 0.05))],
                   version_field="model_config.release")
    report = migrate(path, reg)
    assert report.format == "nemo" and report.verified
    with tarfile.open(report.output) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        config = yaml.safe_load(tar.extractfile("./model_config.yaml").read())  # type: ignore[union-attr]
        weights = torch.load(tar.extractfile("./model_weights.ckpt"), weights_only=True)  # type: ignore[arg-type]
        record = json.loads(tar.extractfile("./tensorparity_migrations.json").read())  # type: ignore[union-attr]
    assert names == sorted(["./model_config.yaml", "./model_weights.ckpt", "./tensorparity_migrations.json",
                            f"./{artifact_name('tokenizer.model')}"])
    assert list(weights) == ["head.weight"]  # no record key among the weights
    assert config == {"target": "demo.Model", "release": "2.0", "optim": {"lr": 0.05}}  # no record in the config
    assert record["history"][0]["to"] == "2.0"
    assert migrate(report.output, reg).verdict == "up to date"


class Settings:
    """A custom object in a checkpoint: tensorparity reads it without running it, and cannot write it back."""

    def __init__(self) -> None:
        self.depth = 3


def test_objects_that_were_never_executed_are_named_before_writing_and_can_be_dropped(tmp_path: Path) -> None:
    torch.save({"release": "1.0", "model": {"w": torch.ones(2)}, "settings": Settings()}, tmp_path / "run.pt")
    keep = Registry("demo", [Migration("2.0", "noop-rename", mapping=Mapping([Rule("model.w", "model.weight")]))],
                    version_field="release")
    with pytest.raises(UsageError, match=r"object\(s\) the pickle named were never executed and cannot be written "
                                         r"back: settings"):
        migrate(tmp_path / "run.pt", keep, dry_run=True)
    drop = Registry("demo", [*keep.migrations, Migration("2.0.1", "drop-settings",
                                                           function=lambda tree: tree.delete("settings*"))],
                    version_field="release")
    report = migrate(tmp_path / "run.pt", drop)
    assert report.verified and set(torch.load(report.output, weights_only=True)) == {
        "release", "model", "tensorparity_migrations"}


def test_the_demo_step_dry_run_in_place_diff(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=100, color_system=None)
    old_release.step(console, tmp_path)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "dry run: 1.0 -> 2.0 through 3 migrations" in out and "verified bitwise" in out
    assert "Value mismatches: 0 → identical" in out and "up to date:" in out
    assert sorted(p.name for p in (tmp_path / "migrate").iterdir()) == ["run_v1.pt", "run_v1.pt.bak"]
