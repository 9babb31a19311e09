"""Migrations as data: Version ordering, Migration/Registry validation, and loading a registry from
a YAML spec, a Python file and a module (every spec problem reported at once, with its line)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import tensorparity
from tensorparity.examples import old_release
from tensorparity.mapping import Mapping, Rule
from tensorparity.migrate import (
    DowngradeError,
    Migration,
    MigrationError,
    Registry,
    Tree,
    Version,
    load_migrations,
    migration,
    tie_weights,
)


def test_version_order_is_numeric_with_prereleases() -> None:
    ordered = ["0.9", "1.9.0rc1", "1.9", "1.10.0.dev1", "1.10a1", "1.10", "1.10.post1", "2"]
    assert sorted(ordered, key=Version) == ordered
    assert Version("2.0.0") == Version("2.0") == Version("v2")
    with pytest.raises(MigrationError, match="'two' is not a version number; fix: write versions"):
        Version("two")


def test_migration_needs_a_name_and_something_to_do() -> None:
    with pytest.raises(MigrationError, match="has neither a mapping nor a function"):
        Migration("2.0", "empty")
    with pytest.raises(MigrationError, match="inverse 'auto' inverts a mapping, but it also has a function"):
        Migration("2.0", "x", function=print, inverse="auto")
    with pytest.raises(MigrationError, match="is the number 1.1, not a version"):
        Migration(1.10, "x", function=print)  # type: ignore[arg-type] - YAML's float trap


def test_inverse_auto_inverts_the_mapping_and_a_missing_inverse_refuses() -> None:
    m = Migration("2.0", "rename", mapping=Mapping([Rule("dec.{p}", "head.{p}")]), inverse="auto")
    back = m.inverted()
    assert back.name == "undo rename" and back.mapping.map_key("head.bias") == ["dec.bias"]
    with pytest.raises(DowngradeError, match="'fix' .2.0. has no inverse"):
        Migration("2.0", "fix", function=print).inverted()


def test_registry_sorts_stably_and_refuses_duplicate_names() -> None:
    reg = Registry("r", [Migration("2.0", "c", function=print), Migration("1.5", "a", function=print),
                         Migration("1.5.0", "b", function=print)])
    assert [m.name for m in reg.migrations] == ["a", "b", "c"]
    assert reg.current == "2.0" and reg.versions == ("1.5", "2.0")
    assert [m.name for m in reg.between("1.5", "2.0")] == ["c"]
    with pytest.raises(MigrationError, match="'a' used twice"):
        Registry("r", [Migration("1.0", "a", function=print), Migration("2.0", "a", function=print)])


def test_decorator_makes_a_migration_from_a_tree_function() -> None:
    @migration("3.0")
    def head_tie(tree: Tree) -> None:
        """Tie the head to the embedding."""
        tie_weights({"head.w": "embed.w"})(tree)

    assert head_tie.name == "head_tie" and head_tie.description == "Tie the head to the embedding."
    tree = Tree(dict(tensorparity.open({"embed.w": torch.ones(2)})))
    head_tie.function(tree)  # type: ignore[misc]
    assert torch.equal(tree.tensor("head.w"), torch.ones(2))


def test_yaml_spec_and_python_registry_of_the_example_agree() -> None:
    from_yaml = load_migrations(old_release.SPEC)
    assert from_yaml.name == old_release.MIGRATIONS.name == "reference-model"
    assert [(m.version, m.name, m.kinds) for m in from_yaml.migrations] == \
        [(m.version, m.name, m.kinds) for m in old_release.MIGRATIONS.migrations]
    assert from_yaml.version_field == ("release",) and from_yaml.source == str(old_release.SPEC)
    assert from_yaml.migrations[1].mapping.rules == old_release.MIGRATIONS.migrations[1].mapping.rules


def test_module_and_module_attribute_load(tmp_path: Path) -> None:
    assert load_migrations("tensorparity.examples.old_release").name == "reference-model"
    assert load_migrations("tensorparity.examples.old_release:MIGRATIONS").current == "2.0"
    with pytest.raises(MigrationError, match="has no attribute 'NOPE'"):
        load_migrations("tensorparity.examples.old_release:NOPE")
    with pytest.raises(MigrationError, match="package 'no_such_pkg_xyz' is not installed"):
        load_migrations("no_such_pkg_xyz.migrations")


def test_python_file_with_a_list_of_migrations(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("SUFFIX = '.weight'\n")
    path = tmp_path / "my_migrations.py"
    path.write_text(textwrap.dedent("""
        from helpers import SUFFIX  # a sibling module: the file's folder is on sys.path
        from tensorparity.migrate import Migration, migration

        @migration("2.0")
        def rename(tree):
            tree.move("w", "w" + SUFFIX)

        MIGRATIONS = [rename]
    """))
    reg = load_migrations(str(path))
    assert reg.name == "my_migrations" and [m.name for m in reg.migrations] == ["rename"]


def test_python_file_errors_are_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(MigrationError, match="raised RuntimeError: boom"):
        load_migrations(str(broken))
    wrong = tmp_path / "wrong.py"
    wrong.write_text("MIGRATIONS = 42\n")
    with pytest.raises(MigrationError, match="is a int, not a Registry or a list of Migrations"):
        load_migrations(str(wrong))
    with pytest.raises(MigrationError, match="no such Python file"):
        load_migrations(str(tmp_path / "absent.py"))


def test_spec_reports_every_problem_at_once_with_lines(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(textwrap.dedent("""\
        name: demo
        version_fiel: release
        migrations:
          - version: 2.10
            name: a
            mapping: {rules: [{a: x, b: y}]}
          - version: '2.0'
            name: b
            stpes: []
          - version: '3.0'
            name: c
            steps:
              - tie: {head.w: embed.w}
              - teleport: {a: b}
          - version: '4.0'
            name: d
            mapping: {rules: [{a: 'l.{i}', b: 'm.{j}'}]}
    """))
    with pytest.raises(MigrationError) as info:
        load_migrations(spec)
    text = str(info.value)
    assert "\n" not in text
    assert "problems in the migrations spec, nothing was migrated" in text
    for needle in ("line 2: version_fiel: unknown field 'version_fiel' (fix: did you mean 'version_field'?)",
                   "line 4: migrations[0]: migration 'a' version is the number 2.1", "line 9: migrations[1].stpes: unknown field 'stpes'",
                   "unknown step 'teleport'", "migrations[3].mapping"):
        assert needle in text, text


def test_spec_call_step_imports_a_function_beside_the_spec(tmp_path: Path) -> None:
    (tmp_path / "fixes.py").write_text("def scale(tree, *, key, by):\n    tree.set(key, tree.value(key) * by)\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: demo\nmigrations:\n  - version: '2.0'\n    name: scale\n"
                    "    steps:\n      - call: fixes.py:scale\n        args: {key: epoch, by: 10}\n")
    reg = load_migrations(spec)
    tree = Tree(dict(tensorparity.open({"epoch": 3, "w": torch.ones(1)})))
    reg.migrations[0].function(tree)  # type: ignore[misc]
    assert tree.value("epoch") == 30
    spec.write_text(spec.read_text().replace("fixes.py:scale", "fixes.py:nope"))
    with pytest.raises(MigrationError, match="has no attribute 'nope'"):
        load_migrations(spec)


def test_spec_missing_file_and_wrong_type() -> None:
    with pytest.raises(MigrationError, match="no such migrations spec; fix: check the path"):
        load_migrations("absent.yaml")
    with pytest.raises(MigrationError, match="must be a Registry, a list of Migration or a path, not int"):
        load_migrations(42)  # type: ignore[arg-type]
