"""A .nemo's migration record is a member of its own, beside model_config.yaml (which keeps the
source's bytes); records that earlier versions wrote into the config are still recognised; diff
leaves tensorparity's records out unless asked."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

import tensorparity
from tensorparity.cli import app
from tensorparity.examples.formats import write_nemo
from tensorparity.mapping import Mapping, Rule
from tensorparity.migrate import Migration, Registry, convert, migrate, read_history
from tensorparity.numerics import Tolerance

CONFIG = {"target": "demo.Model", "hidden": 4, "optim": {"lr": 0.1}}


def members(path: Path | str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def rename(*more: Migration) -> Registry:
    # No version field: the version is the record's (default 1.0 before any migration).
    return Registry("demo", [Migration("2.0", "rename", mapping=Mapping([Rule("decoder.{p}", "head.{p}")])), *more],
                    default_version="1.0")


def test_the_record_is_a_member_and_the_config_keeps_its_bytes(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    source = write_nemo(tmp_path / "m.nemo", {"decoder.weight": w}, CONFIG)
    expected = write_nemo(tmp_path / "expected.nemo", {"head.weight": w}, CONFIG)
    report = migrate(source, rename())
    assert report.verified
    out, before = members(report.output), members(source)
    assert out["./model_config.yaml"] == before["./model_config.yaml"]  # byte for byte
    record = json.loads(out["./tensorparity_migrations.json"])
    assert [(h["registry"], h["from"], h["to"]) for h in record["history"]] == [("demo", "1.0", "2.0")]
    with tensorparity.open(report.output) as ckpt:
        assert ckpt.section_of("tensorparity_migrations") == "records"
        assert "model_config.tensorparity_migrations" not in ckpt
        assert read_history(ckpt)[0]["to"] == "2.0"
    assert migrate(report.output, rename()).verdict == "up to date"

    same = tensorparity.diff(report.output, expected, tolerance=Tolerance(exact=True),
                             weights_only=False)
    assert same.verdict == "identical" and not same.only_in_a and not same.only_in_b
    assert "tensorparity's migration record in A left out (--include-records / include_records=True compares it)" \
        in same.notes
    asked = tensorparity.diff(report.output, expected, weights_only=False, include_records=True)
    assert asked.verdict == "differs" and [k.key for k in asked.only_in_a] == ["tensorparity_migrations"]


def test_a_record_inside_the_config_from_earlier_versions_is_recognised_and_moved_out(tmp_path: Path) -> None:
    old = {"schema": "tensorparity.migration-record/1",
           "history": [{"registry": "demo", "from": "1.0", "to": "2.0", "migrations": []}]}
    # What earlier versions wrote: the record as a key of model_config.yaml.
    source = write_nemo(tmp_path / "old.nemo", {"head.weight": torch.randn(4, 3)},
                        {**CONFIG, "tensorparity_migrations": json.dumps(old)})
    assert migrate(source, rename()).verdict == "up to date"

    up = migrate(source, rename(Migration("3.0", "scale", function=lambda tree: tree.set("model_config.hidden", 8))))
    assert up.plan.version == "2.0" and up.verified
    out = members(up.output)
    config = yaml.safe_load(out["./model_config.yaml"])
    assert config == {**CONFIG, "hidden": 8}  # the record left the config
    history = json.loads(out["./tensorparity_migrations.json"])["history"]
    assert [(h["from"], h["to"]) for h in history] == [("1.0", "2.0"), ("2.0", "3.0")]
    with tensorparity.open(source) as a, tensorparity.open(up.output) as b:
        report = tensorparity.diff(a, b, weights_only=False)
    assert "tensorparity's migration record in A and B left out" in " ".join(report.notes)
    assert [v.key for v in report.values] == ["model_config.hidden"] and not report.only_in_a


def test_the_record_travels_through_convert_and_back(tmp_path: Path) -> None:
    source = write_nemo(tmp_path / "m.nemo", {"decoder.weight": torch.randn(4, 3)}, CONFIG)
    migrated = migrate(source, rename()).output
    text = members(migrated)["./tensorparity_migrations.json"].decode()
    convert(migrated, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()["tensorparity.migrations"] == text
    convert(tmp_path / "m.safetensors", tmp_path / "again.nemo")
    again = members(tmp_path / "again.nemo")
    assert again["./tensorparity_migrations.json"].decode() == text
    assert again["./model_config.yaml"] == members(source)["./model_config.yaml"]
    assert migrate(tmp_path / "again.nemo", rename()).verdict == "up to date"


def test_cli_diff_include_records(tmp_path: Path) -> None:
    state = {"w": torch.randn(3)}
    torch.save({"release": "1.0", "model": state}, tmp_path / "run.pt")
    reg = Registry("demo", [Migration("2.0", "noop", function=lambda tree: None)], version_field="release",
                   set_version_field=False)
    out = migrate(tmp_path / "run.pt", reg).output
    runner = CliRunner(env={"COLUMNS": "200"})
    plain = runner.invoke(app, ["diff", "--all-keys", str(out), str(tmp_path / "run.pt")])
    assert plain.exit_code == 0, plain.output
    assert "tensorparity's migration record in A left out (--include-records" in " ".join(plain.output.split())
    asked = runner.invoke(app, ["diff", "--all-keys", "--include-records", str(out), str(tmp_path / "run.pt")])
    assert asked.exit_code == 1 and "tensorparity_migrations" in asked.output
