"""One vocabulary (issue #14): every command's --help uses the same words for the same things. The
app itself is walked (typer -> click), so a command added later is held to it too; and the CLI
starts without the library or torch."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.cli._options import TOP

from _cli_helpers import assert_one_line_error


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    children = getattr(command, "commands", None)
    if children is None:
        return [(" ".join(path), command)]
    return [leaf for name, child in sorted(children.items()) for leaf in _commands(child, (*path, name))]


COMMANDS = _commands(typer.main.get_command(app))


def _options() -> list[tuple[str, Any]]:
    return [(name, p) for name, cmd in COMMANDS for p in cmd.params
            if p.param_type_name == "option" and "--help" not in p.opts]


def test_the_walk_finds_every_command() -> None:
    names = {name for name, _ in COMMANDS}
    assert {"inspect", "diff", "capture", "compare", "replay", "resume-check", "load-check", "convert", "migrate",
            "map suggest", "dataloader-state convert", "dataloader-state inspect"} <= names


def test_each_option_has_one_help_text_and_one_default_in_every_command() -> None:
    helps: dict[str, set[str]] = defaultdict(set)
    defaults: dict[str, set[str]] = defaultdict(set)
    where: dict[str, set[str]] = defaultdict(set)
    for command, p in _options():
        for name in (*p.opts, *p.secondary_opts):
            helps[name].add(p.help or "")
            defaults[name].add(repr(p.default))
            where[name].add(command)
    differing = {name: (sorted(where[name]), sorted(helps[name])) for name in helps if len(helps[name]) > 1}
    assert not differing, f"one option, several help texts: {differing}"
    differing = {name: (sorted(where[name]), sorted(defaults[name])) for name in defaults if len(defaults[name]) > 1}
    assert not differing, f"one option, several defaults: {differing}"


def test_a_short_flag_means_one_long_option() -> None:
    meaning: dict[str, set[str]] = defaultdict(set)
    for _, p in _options():
        longs = [o for o in p.opts if o.startswith("--")]
        for short in (o for o in p.opts if not o.startswith("--")):
            meaning[short].add(longs[0])
    assert {s: sorted(m) for s, m in meaning.items() if len(m) > 1} == {}
    assert meaning["-m"] == {"--map"} and meaning["-k"] == {"--keys"} and meaning["-o"] == {"--output"}


def test_top_has_one_default_everywhere() -> None:
    tops = {command: p.default for command, p in _options() if "--top" in p.opts}
    assert len(tops) >= 7 and set(tops.values()) == {TOP}, tops
    assert TOP == 10  # the documented default (README, docs/*.md: "default 10")


def test_old_spellings_are_hidden_aliases_of_the_new_words() -> None:
    for name, cmd in COMMANDS:
        opts = {o for p in cmd.params for o in p.opts}
        assert "--json" in opts or name == "capture", name  # capture prints a summary, its trace is the result
        hidden = {o for p in cmd.params if getattr(p, "hidden", False) for o in p.opts}
        assert hidden <= {"--force", "--out", "--model"}, name
        assert "--force" not in opts or "--overwrite" in opts, name
        assert "--out" not in opts or "--output" in opts, name


@pytest.mark.parametrize("command", ["replay", "load-check"])
def test_the_model_is_positional_and_the_old_model_option_still_works(command: str, tmp_path: Path) -> None:
    runner = CliRunner()
    # Usage errors come before anything is read, so the paths need not exist.
    both = runner.invoke(app, [command, str(tmp_path / "x"), "a:b", "--model", "a:b"])
    assert both.exit_code == 2 and "give the model once" in both.output
    neither = runner.invoke(app, [command, str(tmp_path / "x")])
    assert neither.exit_code == 2 and "Missing argument 'MODEL'" in neither.output
    for words in (["a.py:nope"], ["--model", "a.py:nope"]):  # either spelling reaches the factory
        result = runner.invoke(app, [command, str(tmp_path / "x"), *words])
        assert result.exit_code == 2 and "Missing argument" not in result.output


def test_capture_needs_an_output_once(tmp_path: Path) -> None:
    runner = CliRunner()
    neither = runner.invoke(app, ["capture", "tensorparity.examples:reference_model"])
    assert neither.exit_code == 2 and "Missing option '--output'" in neither.output
    both = runner.invoke(app, ["capture", "tensorparity.examples:reference_model", "-o", str(tmp_path / "a"),
                               "--out", str(tmp_path / "b")])
    assert both.exit_code == 2 and "give the output once" in both.output


def test_migrate_has_no_m_short_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["migrate", str(tmp_path / "x.pt"), "-m", "spec.yaml"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_a_negative_top_is_one_line_with_the_fix(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--top", "-1"])
    assert_one_line_error(result, "--top must be 0 or more, not -1", "fix: pass e.g. --top 20")


# Starting the CLI imports neither torch nor the library: only the package's lazy root, the report
# stream every command prints to, and the version string.
_LAZY = """
import sys
from tensorparity.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
torch = any(m.split(".")[0] == "torch" for m in sys.modules)
library = sorted(m for m in sys.modules if m.startswith("tensorparity.") and not m.startswith("tensorparity.cli"))
print(code, torch, *library, file=sys.stderr)
"""
_LIGHT = {"tensorparity._version", "tensorparity.report", "tensorparity.report._stream"}
_BODY = {"tensorparity._output", "tensorparity._atomic", "tensorparity.errors", "tensorparity.report._protocol"}  # a command body, before its first check


@pytest.mark.parametrize(("args", "body"), [
    (["--help"], False), (["diff", "--help"], False), (["capture", "--help"], False),
    (["map", "suggest", "-h"], False), (["diff", "a", "--json"], False),  # a usage error that click finds
    # a usage error that the command finds: its body started, and with it the light modules every
    # command loads first (so that Ctrl-C is noted for a writer); torch is still not loaded
    (["replay", "ref"], True),
])
def test_the_cli_starts_without_the_library_or_torch(args: list[str], body: bool) -> None:
    done = subprocess.run([sys.executable, "-c", _LAZY, *args], capture_output=True, text=True, timeout=120)
    code, torch, *library = done.stderr.strip().splitlines()[-1].split()
    assert code in ("0", "2") and torch == "False", done.stderr
    assert set(library) <= (_LIGHT | _BODY if body else _LIGHT), done.stderr
