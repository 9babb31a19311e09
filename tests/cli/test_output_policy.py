"""The one output policy (issue #12): every writer refuses an existing path without --overwrite and
an input even with it, writes atomically with the user's umask; --json prints one JSON document
on stdout, errors included, whatever the user's code prints; Ctrl-C is one line and exit 130."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from tensorparity._output import check_output, note_interrupt, write_failure, write_text
from tensorparity.cli import app
from tensorparity.errors import UsageError
from tensorparity.examples import reference_model
from tensorparity.trace import capture

runner = CliRunner(env={"COLUMNS": "160"})
CLI = [sys.executable, "-c", "from tensorparity_cli import main; main()"]


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("t") / "ref"
    model = reference_model()
    with capture(model, out=folder):
        model(torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(0))).sum().backward()
    return folder


def test_compare_html_refuses_an_existing_file_and_an_input(trace: Path, tmp_path: Path) -> None:
    html = tmp_path / "precious.pt"
    html.write_bytes(b"a checkpoint")
    assert_one_line_error(invoke("compare", trace, trace, "--html", html), "the output file exists",
                          "pass --overwrite to replace it")
    assert html.read_bytes() == b"a checkpoint"
    manifest = trace / "manifest.json"
    before = manifest.read_bytes()
    assert_one_line_error(invoke("compare", trace, trace, "--html", manifest, "--overwrite"),
                          "refusing to write the HTML report over (or into) an input")
    assert manifest.read_bytes() == before
    replaced = invoke("compare", trace, trace, "--html", html, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert html.read_text().lstrip().lower().startswith("<!doctype html")


def test_resume_check_html_refuses_an_existing_file_before_running(tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    html.write_text("keep me")
    started = time.perf_counter()
    result = invoke("resume-check", "tensorparity.examples.resume_recipes:TinyRecipe", "-n", "4", "--resume-at", "2",
                    "--html", html)
    assert_one_line_error(result, "report.html", "the output file exists", "--overwrite")
    assert html.read_text() == "keep me"
    assert time.perf_counter() - started < 60  # refused up front, not after the legs ran (generous bound)


def test_written_files_follow_the_umask_and_replace_atomically(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        target = tmp_path / "m.yaml"
        write_text(target, "version: 1\n")
        assert target.stat().st_mode & 0o777 == 0o640  # open()'s 0o666 under the umask, not mkstemp's 0o600
        write_text(target, "version: 2\n")
        assert target.read_text() == "version: 2\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]  # no temporary left behind
    finally:
        os.umask(old)


def test_check_output_refuses_a_folder_holding_an_input_and_a_missing_parent(tmp_path: Path) -> None:
    src = tmp_path / "in" / "a.pt"
    src.parent.mkdir()
    src.write_bytes(b"x")
    with pytest.raises(UsageError, match="over \\(or into\\) an input"):
        check_output(tmp_path / "in", [src], overwrite=True, folder=True)
    with pytest.raises(UsageError, match="over \\(or into\\) an input"):
        check_output(tmp_path / "in" / "new.html", [tmp_path / "in"], overwrite=True)
    with pytest.raises(UsageError, match="the output folder does not exist"):
        check_output(tmp_path / "nowhere" / "x.html", [src], overwrite=False)
    check_output(tmp_path / "out.html", [src, None], overwrite=False)  # a new file elsewhere is fine


@pytest.mark.parametrize(("exc", "cause"), [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full (No space left on device); fix: free disk"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is exceeded"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied (Permission denied); fix: write to a folder"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
    (OSError(errno.EFBIG, "File too large"), "larger than this process may write"),
])
def test_a_failed_write_is_named_by_its_cause(exc: OSError, cause: str, tmp_path: Path) -> None:
    error = write_failure(exc, "the report", tmp_path / "r.html")
    assert isinstance(error, UsageError) and cause in str(error), str(error)


def test_a_writer_error_after_ctrl_c_is_an_interrupt_not_a_disk_problem(tmp_path: Path, monkeypatch:
                                                                        pytest.MonkeyPatch) -> None:
    # torch's zip writer turns a signal into "RuntimeError: [enforce fail at inline_container.cc...]"
    writer_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert isinstance(write_failure(writer_error, "the checkpoint", tmp_path / "x.pt"), UsageError)
    monkeypatch.setattr("tensorparity._output._INTERRUPTED", False)
    note_interrupt()
    assert isinstance(write_failure(writer_error, "the checkpoint", tmp_path / "x.pt"), KeyboardInterrupt)


def test_json_errors_are_one_document_on_stdout(tmp_path: Path) -> None:
    missing = invoke("inspect", tmp_path / "nope.pt", "--json")
    assert missing.exit_code == 2
    doc = json.loads(missing.stdout)
    assert doc == {"schema": "tensorparity.error/1", "error": "no such file or folder", "fix": "check the path",
                   "exit_code": 2, "path": str(tmp_path / "nope.pt"), "key": None}
    assert len(missing.stderr.splitlines()) == 1
    # click's own usage errors too (through the real entry point)
    bad = subprocess.run([*CLI, "inspect", "--bogus", "--json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["schema"] == "tensorparity.error/1" and "--bogus" in json.loads(bad.stdout)["error"]


FACTORY = """
import os, sys
from tensorparity.examples import port_model

def make():
    print("Model PortModel was successfully restored")           # NeMo's restore_from logs to stdout
    os.write(1, b"[C] written to file descriptor 1 directly\\n")  # and native code can too
    return port_model()
"""


def test_json_stays_json_when_the_users_factory_prints(tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text(FACTORY)
    ckpt = tmp_path / "reference.pt"
    torch.save(reference_model().state_dict(), ckpt)
    mapping = Path(__file__).resolve().parents[2] / "src" / "tensorparity" / "examples" / "reference_to_port.yaml"
    result = subprocess.run([*CLI, "load-check", str(ckpt), "noisy.py:make", "--map", str(mapping),
                             "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema"] == "tensorparity.load-check/1"  # nothing else on stdout
    assert "successfully restored" in result.stderr and "[C] written" in result.stderr


SLOW_FACTORY = """
import pathlib, time
from tensorparity.examples import port_model

def make():
    pathlib.Path("started").write_text("yes")
    time.sleep(60)
    return port_model()
"""


def _mapped(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupted(cmd: list[str], cwd: Path, *, marker: Path | None = None,
                 mapped: str | None = None) -> tuple[int, str, str]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while (proc.poll() is None and time.monotonic() < deadline
           and not (marker is not None and marker.exists()) and not (mapped and _mapped(proc.pid, mapped))):
        time.sleep(0.002)
    if proc.poll() is not None:
        proc.communicate()
        pytest.skip("the command finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_ctrl_c_is_one_line_and_exit_130_at_start_up_and_at_work(tmp_path: Path) -> None:
    ckpt = tmp_path / "reference.pt"
    torch.save(reference_model().state_dict(), ckpt)
    # while Python imports torch: the signal is sent once torch's library is mapped into the
    # process (the import then runs for a while longer, loading its Python modules)
    code, out, err = _interrupted([*CLI, "inspect", str(ckpt)], tmp_path, mapped="libtorch_cpu")
    assert (code, out, err) == (130, "", "interrupted\n")
    # while the user's factory runs
    (tmp_path / "slow.py").write_text(SLOW_FACTORY)
    code, out, err = _interrupted([*CLI, "load-check", str(ckpt), "slow.py:make", "--json"], tmp_path,
                                  marker=tmp_path / "started")
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    doc = json.loads(out)  # --json: the interruption is a document too
    assert doc["schema"] == "tensorparity.error/1" and doc["exit_code"] == 130
