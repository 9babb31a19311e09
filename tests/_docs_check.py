"""Run a documentation page and compare what it shows with what the code prints.

A page is checked block by block, in order, in one temporary folder (the page's files live there
for the whole page, so a file one block writes is there for the next):

- a ```` ```python ```` block runs in one namespace per page; when a ```` ```text ```` block
  follows it (blank lines only between), that block is the snippet's stdout. A block marked
  ``<!-- docs: setup -->`` runs without its output compared (it writes the example files).
- a ```` ```pycon ```` block (or a ```` ```python ```` one starting with ``>>>``) runs as a
  doctest in the same namespace; ``...`` in an expected value matches anything (ELLIPSIS).
- a block marked ``<!-- docs: file NAME -->`` is written to NAME (a module a command imports).
- a ```` ```console ```` block: each ``$ command`` line runs, and the lines under it up to the
  next ``$`` are its output (stdout and stderr, as a terminal shows them). ``tensorparity ...``
  runs in-process through typer's ``CliRunner`` at the page's width, ``echo $?`` prints the
  previous exit code, anything else runs under ``bash`` with ``.venv/bin`` first on ``PATH``.
  A shown line ``...`` stands for any number of lines (an excerpt).
- a block marked ``<!-- docs: not checked: REASON -->`` is skipped and counted; one marked
  ``<!-- docs: skip if installed: PKG -->`` (output shown without an optional package) is run
  only where PKG is not installed.

Page directive: ``<!-- docs: columns=N -->`` (the terminal width the page was rendered at; 100
when absent). What legitimately varies between runs is normalised on both sides first
(:func:`normalise`); nothing else is.

What varies between machines: torch's kernels sum in another order on another CPU (AVX2 against
AVX-512, another BLAS code path), so a port's float32 differences, the statistics of a tensor and
the digest of a file holding computed values differ in their last digits from one machine to the
next. A block whose output differs from the page only in numbers and hex digests (12 digits or
more), and in the spaces and line breaks that fit them, is accepted (:func:`_same_but_numbers`):
every word, verdict and name must still be the page's, as many times (and in the page's order
in an excerpt).
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
DEFAULT_COLUMNS = 100
RUNNABLE = {"python", "pycon", "console", "bash", "sh", "shell", "py"}
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs:\s*(.*?)\s*-->\s*$")
_SHELL_SYNTAX = re.compile(r"[|;&<>`$()]")


@dataclass
class Block:
    lang: str
    start: int  # index of the opening fence line
    end: int  # index of the closing fence line
    directive: str | None

    @property
    def skip_reason(self) -> str | None:
        """Why the block is not run here (None: it is run)."""
        if self.directive and self.directive.startswith("not checked"):
            return self.directive.partition(":")[2].strip()
        if self.directive and self.directive.startswith("skip if installed:"):
            name = self.directive.partition(":")[2].strip()
            if importlib.util.find_spec(name) is not None:
                return f"shows the output without {name}, which is installed here"
        return None


@dataclass
class Mismatch:
    line: int  # 1-based line of the shown output's first line (or the command)
    what: str
    expected: list[str]
    actual: list[str]
    start: int  # replace lines[start:end] with actual to update the page
    end: int
    elided: bool = False
    updatable: bool = True


@dataclass
class PageResult:
    path: Path
    checked: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)


def page_skip_reason(lines: list[str]) -> str | None:
    """``<!-- docs: page not checked: REASON -->``: a page whose blocks are not run yet, and why."""
    for line in lines:
        m = _DIRECTIVE.match(line)
        if m and m.group(1).startswith("page not checked"):
            return m.group(1).partition(":")[2].strip()
    return None


def parse(lines: list[str]) -> tuple[list[Block], int]:
    blocks, columns, i = [], DEFAULT_COLUMNS, 0
    page_reason = page_skip_reason(lines)
    for line in lines:
        m = _DIRECTIVE.match(line)
        if m and m.group(1).startswith("columns="):
            columns = int(m.group(1).partition("=")[2])
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip().split()[0] if lines[i][3:].strip() else ""
            j = i + 1
            while j < len(lines) and lines[j].rstrip() != "```":
                j += 1
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = _DIRECTIVE.match(lines[k]) if k >= 0 else None
            directive = m.group(1) if m else None
            if page_reason is not None and not (directive or "").startswith("not checked"):
                directive = f"not checked: {page_reason}"
            blocks.append(Block(lang, i, j, directive))
            i = j + 1
        else:
            i += 1
    return blocks, columns


# ---------------------------------------------------------------------------------- normalise
_VOLATILE = [
    # durations and speeds: "0.42 s", "12 ms", "1.3 GB/s", "3.1 µs"
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|µs|us|ns|s|min)\b(?!/)"), "<t>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?[KMGT]?B/s\b"), "<speed>"),
    # dates and times of day
    # a duration in a JSON report
    (re.compile(r'("seconds": )[0-9.e-]+'), r"\1<t>"),
    # the module name a factory file is imported under holds a hash of its absolute path
    (re.compile(r"(_tensorparity_factory_\w+?_)[0-9a-f]{10}\b"), r"\1<path-hash>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"), "<date>"),
]


def normalise(text: str, tmp: str | None = None) -> list[str]:
    if tmp:
        text = text.replace(os.path.realpath(tmp), "<tmp>").replace(tmp, "<tmp>")
    for pattern, repl in _VOLATILE:
        text = pattern.sub(repl, text)
    out = [line.rstrip() for line in text.splitlines()]
    while out and not out[-1]:
        out.pop()
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    return _matches(expected, actual) or _same_but_numbers(expected, actual)


def _matches(expected: list[str], actual: list[str]) -> bool:
    if "..." not in (line.strip() for line in expected):
        return expected == actual
    parts = [r"(?:[^\n]*\n)*?" if line.strip() == "..." else re.escape(line) + r"\n" for line in expected]
    return re.fullmatch("".join(parts), "".join(a + "\n" for a in actual)) is not None


# A number (a float prints as an integer where it is whole: a relative error of 51 on one machine
# is 2.714 on another) and a hex digest.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_DIGEST = re.compile(r"\b[0-9a-f]{12,}\b")


def words_but_numbers(text: str) -> str:
    """``text``'s words in order, one space apart, every number and hex digest replaced by a mark:
    what must agree between machines (the columns and line breaks that fit numbers of another
    width move with them)."""
    return " ".join(_NUMBER.sub("<num>", _DIGEST.sub("<hex>", text)).split())


def _same_but_numbers(expected: list[str], actual: list[str]) -> bool:
    """The same words and marks where numbers were (:func:`words_but_numbers`): in the same order
    for an excerpt (a shown ``...`` line still stands for any lines), as many of each for a whole
    output (a table header wraps where its column's numbers print narrower than its name)."""
    runs, run = [], []
    for line in expected:
        if line.strip() == "...":
            runs.append(run)
            run = []
        else:
            run.append(line)
    runs.append(run)
    got = words_but_numbers("\n".join(actual))
    if len(runs) == 1:
        return Counter(words_but_numbers("\n".join(expected)).split()) == Counter(got.split())
    pattern = r"\s?.*?\s?".join(re.escape(words_but_numbers("\n".join(r))) for r in runs)
    return re.fullmatch(pattern, got, flags=re.DOTALL) is not None


class _Checker(doctest.OutputChecker):
    """doctest's comparison (ELLIPSIS as the runner asks), then :func:`_same_but_numbers`."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(want, got, optionflags) or _same_but_numbers(want.splitlines(), got.splitlines())


def fill_elided(expected: list[str], actual: list[str]) -> list[str] | None:
    """An excerpt updated: each run of shown lines between ``...`` is replaced by the run of
    actual lines from the best match of its first line to the best match of its last line."""
    out, pos, seg = [], 0, []
    segments: list[list[str] | None] = []
    for line in expected:
        if line.strip() == "...":
            segments.extend([seg, None]) if seg else segments.append(None)
            seg = []
        else:
            seg.append(line)
    if seg:
        segments.append(seg)

    def best(line: str, start: int) -> int | None:
        scores = [(len(os.path.commonprefix([line, a])), -i, i) for i, a in enumerate(actual) if i >= start]
        top = max(scores, default=None)
        return top[2] if top and top[0] >= min(12, len(line)) else None

    for n, seg in enumerate(segments):
        if seg is None:
            out.append("...")
            continue
        first = 0 if n == 0 else best(seg[0], pos)  # a shown start / end is the output's own
        last = (len(actual) - 1 if n == len(segments) - 1 else best(seg[-1], first)) if first is not None else None
        if first is None or last is None:
            return None
        out.extend(actual[first:last + 1])
        pos = last + 1
    return out


# ---------------------------------------------------------------------------------- running
class PageRunner:
    def __init__(self, path: Path, *, tmp: str) -> None:
        self.path = path
        self.lines = path.read_text(encoding="utf-8").splitlines()
        self.blocks, self.columns = parse(self.lines)
        self.tmp = tmp
        self.namespace: dict[str, object] = {"__name__": "__docs__"}
        self.last_exit = 0
        self.result = PageResult(path)

    def run(self) -> PageResult:
        old_cwd, old_columns = os.getcwd(), os.environ.get("COLUMNS")
        os.chdir(self.tmp)
        os.environ["COLUMNS"] = str(self.columns)
        try:
            for n, block in enumerate(self.blocks):
                reason = block.skip_reason
                if block.lang not in RUNNABLE:
                    continue
                if reason is not None:
                    self.result.skipped.append((block.start + 1, reason))
                    continue
                try:
                    self.run_block(n, block)
                except Exception as exc:  # noqa: BLE001 - reported as this block's failure, the page goes on
                    self.result.mismatches.append(Mismatch(
                        block.start + 1, f"```{block.lang} block raised {type(exc).__name__}: {exc}", [],
                        traceback.format_exc().splitlines()[-12:], block.start, block.start, updatable=False))
                self.result.checked += 1
        finally:
            os.chdir(old_cwd)
            if old_columns is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = old_columns
        return self.result

    def run_block(self, n: int, block: Block) -> None:
        if block.directive and block.directive.startswith("file "):
            Path(block.directive.split()[1]).write_text(self._code(block), encoding="utf-8")
        elif block.lang == "pycon" or (block.lang == "python" and self._code(block).lstrip().startswith(">>>")):
            self.run_pycon(block)
        elif block.lang == "python":
            nxt = self.blocks[n + 1] if n + 1 < len(self.blocks) else None
            shows = (nxt is not None and nxt.lang == "text" and nxt.directive is None
                     and all(not ln.strip() for ln in self.lines[block.end + 1:nxt.start]))
            self.run_python(block, nxt if shows and block.directive != "setup" else None)
        elif block.lang == "console":
            self.run_console(block)

    def _code(self, block: Block) -> str:
        return "\n".join(self.lines[block.start + 1:block.end]) + "\n"

    def run_python(self, block: Block, shown: Block | None) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(self._code(block), f"{self.path.name}:{block.start + 2}", "exec"), self.namespace)  # noqa: S102
        if shown is not None:
            self.compare(shown.start + 1, shown.end, f"output of the python block at line {block.start + 1}",
                         out.getvalue())

    def run_pycon(self, block: Block) -> None:
        """A doctest; each failing example is one mismatch (its ``want`` lines, updatable)."""
        failed: list[tuple[doctest.Example, str]] = []

        class Runner(doctest.DocTestRunner):
            def report_failure(self, out, test, example, got):  # type: ignore[no-untyped-def]
                failed.append((example, got))

            def report_unexpected_exception(self, out, test, example, exc_info):  # type: ignore[no-untyped-def]
                failed.append((example, "raised " + "".join(traceback.format_exception_only(*exc_info[:2]))))

        test = doctest.DocTestParser().get_doctest(self._code(block), self.namespace, self.path.name,
                                                   str(self.path), block.start + 1)
        test.globs = self.namespace  # DocTest copies its globs: names a >>> block defines stay for the next blocks
        Runner(checker=_Checker(), optionflags=doctest.ELLIPSIS).run(test, out=lambda _: None, clear_globs=False)
        for example, got in failed:
            first = block.start + 1 + example.lineno + example.source.count("\n")
            want = example.want.splitlines()
            self.result.mismatches.append(Mismatch(
                first + 1, f">>> {example.source.splitlines()[0]}", want, got.rstrip("\n").splitlines(),
                first, first + len(want), updatable=not got.startswith("raised ") and example.exc_msg is None))

    def run_console(self, block: Block) -> None:
        body = range(block.start + 1, block.end)
        commands = [i for i in body if self.lines[i].startswith("$ ")]
        for k, i in enumerate(commands):
            stop = commands[k + 1] if k + 1 < len(commands) else block.end
            output = self.execute(self.lines[i][2:])
            self.compare(i + 1, stop, f"$ {self.lines[i][2:]}", output)

    def execute(self, command: str) -> str:
        words = shlex.split(command, comments=True)
        if words == ["echo", "$?"]:
            return f"{self.last_exit}\n"
        unquoted = re.sub(r"'[^']*'", "''", command)  # nothing inside single quotes is shell syntax
        if words and words[0] == "tensorparity" and not _SHELL_SYNTAX.search(unquoted.partition("#")[0]):
            from typer.testing import CliRunner

            from tensorparity.cli import app

            result = CliRunner(env={"COLUMNS": str(self.columns)}).invoke(app, words[1:])
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            self.last_exit = result.exit_code
            return result.output
        env = dict(os.environ, COLUMNS=str(self.columns), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        proc = subprocess.run(["bash", "-c", command], cwd=self.tmp, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
        self.last_exit = proc.returncode
        return proc.stdout

    def compare(self, first: int, stop: int, what: str, output: str) -> None:
        expected = normalise("\n".join(self.lines[first:stop]))
        actual = normalise(output, self.tmp)
        if not matches(expected, actual):
            raw = output.replace(os.path.realpath(self.tmp), "<tmp>").replace(self.tmp, "<tmp>")
            raw = [line.rstrip() for line in raw.splitlines()]
            while raw and not raw[-1]:
                raw.pop()
            self.result.mismatches.append(Mismatch(first, what, expected, raw, first, stop,
                                                   elided="..." in (e.strip() for e in expected)))


def run_page(path: Path) -> PageResult:
    with tempfile.TemporaryDirectory(prefix="tp-docs-") as tmp:
        return PageRunner(path, tmp=tmp).run()


def update_page(path: Path) -> tuple[PageResult, list[str]]:
    """Rewrite the page's shown outputs from a real run; returns what could not be updated."""
    result = run_page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    problems = []
    for m in sorted(result.mismatches, key=lambda m: m.start, reverse=True):
        if not m.updatable:
            problems.append(f"{path.name}:{m.line}: {m.what}; fix it by hand:\n    " + "\n    ".join(m.actual))
            continue
        new = fill_elided(lines[m.start:m.end], m.actual) if m.elided else m.actual
        if new is None:
            problems.append(f"{path.name}:{m.line}: an excerpt ('...') whose lines no longer match; edit by hand")
            continue
        old = lines[m.start:m.end]
        trailing = len(old) - len([ln for ln in old if ln.strip()] and old[:max(i for i, ln in enumerate(old) if ln.strip()) + 1])
        lines[m.start:m.end] = new + [""] * trailing  # keep the blank lines that separate commands
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return result, problems
