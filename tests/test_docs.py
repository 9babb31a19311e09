"""The docs show real output: every command and snippet on README.md and docs/*.md runs here, and
what a page shows under it must be what it prints (tests/_docs_check.py says how a page is read).

Regenerate a page's shown output after a change to what the tool prints:

    .venv/bin/python tests/test_docs.py --update docs/diff.md [docs/trace.md ...]

(then read the diff: the update writes what the tool prints now, nothing else).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _docs_check import PAGES, RUNNABLE, ROOT, page_skip_reason, parse, run_page, update_page  # noqa: E402


def _report(result: object) -> str:
    parts = []
    for m in result.mismatches:  # type: ignore[attr-defined]
        parts.append(f"--- {result.path.name}:{m.line}: {m.what}\n"  # type: ignore[attr-defined]
                     + "shown:\n  " + "\n  ".join(m.expected) + "\nprinted:\n  " + "\n  ".join(m.actual))
    return "\n".join(parts)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_shows_real_output(page: Path) -> None:
    reason = page_skip_reason(page.read_text(encoding="utf-8").splitlines())
    if reason is not None:
        pytest.skip(f"{page.relative_to(ROOT)}: not checked yet: {reason}")
    result = run_page(page)
    assert not result.mismatches, (
        f"{page.relative_to(ROOT)}: {len(result.mismatches)} block(s) differ from what the code prints "
        f"(regenerate with: .venv/bin/python tests/test_docs.py --update {page.relative_to(ROOT)})\n"
        + _report(result))


def test_every_block_is_checked_or_says_why() -> None:
    """No command or snippet slips through: each is run, or carries a visible reason."""
    problems = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        blocks, _ = parse(lines)
        for block in blocks:
            where = f"{page.relative_to(ROOT)}:{block.start + 1}"
            reason = block.skip_reason
            if reason is not None:
                if not reason:
                    problems.append(f"{where}: 'not checked' without a reason")
                continue
            if block.lang in {"python", "pycon"}:
                continue
            if block.lang == "console":
                if not any(line.startswith("$ ") for line in lines[block.start + 1:block.end]):
                    problems.append(f"{where}: a console block with no '$ command' line")
                continue
            if any(line.startswith("$ ") for line in lines[block.start + 1:block.end]):
                problems.append(f"{where}: a ```{block.lang} block shows commands ('$ ') that are never run: make it "
                                "```console, or mark it <!-- docs: not checked: REASON -->")
            elif block.lang in RUNNABLE:
                problems.append(f"{where}: a ```{block.lang} block is never run: use ```console with '$ ' lines, "
                                "```python, or mark it <!-- docs: not checked: REASON -->")
    assert not problems, "\n".join(problems)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"--update", "--check"}:
        print(__doc__)
        return 2
    status = 0
    for name in argv[1:] or [str(p) for p in PAGES]:
        page = Path(name).resolve()
        started = time.perf_counter()
        if argv[0] == "--update":
            result, problems = update_page(page)
            print(f"{page.relative_to(ROOT)}: {result.checked} blocks run, {len(result.skipped)} not checked, "
                  f"{len(result.mismatches)} updated output(s) in {time.perf_counter() - started:.1f} s")
            for problem in problems:
                print("  " + problem)
                status = 1
        else:
            result = run_page(page)
            print(f"{page.relative_to(ROOT)}: {result.checked} blocks run, {len(result.skipped)} not checked, "
                  f"{len(result.mismatches)} differ, {time.perf_counter() - started:.1f} s")
            if result.mismatches:
                print(_report(result))
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
