"""``tensorparity resume-check RECIPE --steps N --resume-at K``: does resuming reproduce
uninterrupted training? Exit 0 pass, 1 resume bug, 2 error (bad recipe, nondeterministic training,
bad options)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tensorparity.cli._common import check_output, command, finish
from tensorparity.cli._options import (
    TOP,
    AtolOption,
    HtmlOption,
    JsonOption,
    OverwriteOption,
    RtolOption,
    SeedOption,
    TopOption,
    check_top,
)

if TYPE_CHECKING:
    from tensorparity.numerics import Tolerance

__all__ = ["resume_check_command"]


def _tolerance(profile: str | None, atol: float | None, rtol: float | None) -> Tolerance | str | None:
    from tensorparity.errors import UsageError
    from tensorparity.numerics import Tolerance

    if profile not in (None, "bitwise", "dtype"):
        raise UsageError(f"--tolerance {profile!r} is not bitwise or dtype",
                         fix="pass --tolerance bitwise (default), --tolerance dtype, or --atol/--rtol")
    if atol is None and rtol is None:
        return profile  # None: bitwise, or dtype across world sizes (resume_check decides)
    if profile == "bitwise":
        raise UsageError("--tolerance bitwise compares bytes, so --atol/--rtol would be ignored",
                         fix="drop --tolerance bitwise to use --atol/--rtol")
    return Tolerance(atol=atol, rtol=rtol)


@command
def resume_check_command(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="The recipe: 'path/recipe.py:Recipe' or "
                                          "'package.module:Recipe'.", show_default=False)],
    steps: Annotated[int, typer.Option("--steps", "-n", metavar="N", help="Steps per run (micro-batches with "
                                       "gradient accumulation).", show_default=False)],
    resume_at: Annotated[list[int], typer.Option("--resume-at", metavar="K",
                                                 help="Save after step K and resume in a fresh process; repeatable "
                                                      "(mid-epoch, epoch boundary, inside an accumulation group).",
                                                 show_default=False)],
    chain: Annotated[bool, typer.Option("--chain", help="Resume at every K in turn in one run (K1 → K2 → N) "
                                        "instead of once per K.")] = False,
    tolerance: Annotated[str | None, typer.Option("--tolerance", metavar="bitwise|dtype",
                                                  help="bitwise (default), or torch.testing's tolerances per dtype.",
                                                  show_default=False)] = None,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    seed: SeedOption = 0,
    confirm: Annotated[bool, typer.Option("--confirm/--no-confirm", help="Re-run a failing leg with each suspected "
                                          "component taken from the uninterrupted run.")] = True,
    isolation: Annotated[str | None, typer.Option("--isolation", metavar="fork|spawn",
                                                  help="Fresh processes forked from a server that only imported "
                                                       "torch (Linux default), or a new interpreter per leg.",
                                                  show_default=False)] = None,
    threads: Annotated[int, typer.Option("--threads", metavar="T", help="torch threads in every process "
                                         "(0: torch's default).")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", help="Time limit of each process.")] = 600.0,
    keep: Annotated[Path | None, typer.Option("--keep", metavar="DIR", help="Keep checkpoints, states and logs in a "
                                              "new folder inside DIR.", show_default=False)] = None,
    json_: JsonOption = False,
    html: HtmlOption = None,
    overwrite: OverwriteOption = False,
    top: TopOption = TOP,
    nproc: Annotated[int, typer.Option("--nproc", metavar="N", help="Ranks per leg: above 1, every leg runs under "
                                       "torchrun (gloo on CPU, nccl with a GPU) and the recipe's save()/load() "
                                       "(DCP) is called on every rank.")] = 1,
    resume_nproc: Annotated[int | None, typer.Option("--resume-nproc", metavar="M", help="Ranks of the resumed legs "
                                                     "(default --nproc): resume on another world size through "
                                                     "DCP's resharding.", show_default=False)] = None,
) -> None:
    """Prove that save → fresh process → load → continue equals uninterrupted training.

    Runs the recipe N steps uninterrupted (twice, to tell nondeterminism from resume bugs), then
    K steps and a save, then loads in a fresh process and runs the rest. Compares every step's
    batch, loss, gradient norm and parameters, audits every state component right after the
    load, and names what the checkpoint forgot. --top folds the step rows of each leg. --json
    prints schema tensorparity.resume/1. Exit code: 0 pass, 1 resume bug, 2 error.
    """
    check_top(top)
    if threads < 0:
        from tensorparity.errors import UsageError

        raise UsageError(f"--threads must be 0 or more, not {threads}", fix="pass e.g. --threads 1")
    from tensorparity import resume_check
    from tensorparity._output import write_text

    if html is not None:
        check_output(html, [recipe.split(":")[0] if ".py:" in recipe else None], overwrite, what="the HTML report")
    report = resume_check(recipe, steps=steps, resume_at=resume_at, chain=chain,
                          tolerance=_tolerance(tolerance, atol, rtol), seed=seed,  # type: ignore[arg-type]
                          confirm=confirm, isolation=isolation, threads=threads or None,  # type: ignore[arg-type]
                          timeout=timeout, workdir=keep, nproc=nproc, resume_nproc=resume_nproc)
    if html is not None:
        write_text(html, report.to_html(), what="the HTML report")
    finish(report, json_=json_, top=top)
