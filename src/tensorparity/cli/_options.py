"""The command line's vocabulary, declared once: every option and argument that more than one
command takes (and the few whose short flag is reserved) is an ``Annotated`` alias here, so that
the same word means the same thing, with the same help text and the same default, in every
``--help``. ``tests/cli/test_cli_vocabulary.py`` walks the app and holds every command to it.

Command-specific detail (what a default is for that command, what exactly is matched) belongs
in the command's description, not in a second help text for a shared option.

Light on purpose: typer and the standard library only. The library (and torch) is imported by a
command's body when it runs, never when the CLI starts.

Short flags, one meaning each: ``-o`` ``--output``, ``-m`` ``--map``, ``-k`` ``--keys``,
``-c`` ``--checkpoint``, ``-f`` ``--format``, ``-i``/``-x`` ``--include``/``--exclude``,
``-r`` ``--reference``, ``-n`` ``--steps``, ``-w`` ``--num-workers``, ``-h`` ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from tensorparity.numerics import Tolerance

__all__ = [
    "AtolOption",
    "CheckpointOption",
    "ExactOption",
    "ExcludeOption",
    "ForceOption",
    "FormatOption",
    "HtmlOption",
    "IncludeOption",
    "JsonOption",
    "KeysOption",
    "MapOption",
    "ModelArgument",
    "ModelOption",
    "NanUnequalOption",
    "NoVerifyOption",
    "NoiseFloorOption",
    "OutOption",
    "OutputOption",
    "OverwriteOption",
    "RtolOption",
    "SaveMapOption",
    "SeedOption",
    "StatisticOption",
    "TOP",
    "TolOption",
    "TopOption",
    "WeightsOnlyOption",
    "check_top",
    "joined_pattern",
    "one_model",
    "one_output",
    "parse_tolerance",
]

TOP = 10
"""``--top``'s one default, in every command: rows shown per list before the rest is folded."""

FACTORY = "'pkg.module:function', 'pkg.module:Class' or 'path/to/file.py:function'"

# --- sources ------------------------------------------------------------------------------------

ModelArgument = Annotated[str | None, typer.Argument(
    metavar="MODEL", show_default=False,
    help=f"The model: {FACTORY}, called with no arguments, returning the nn.Module (your code: it is imported "
         "and run); a .nemo file or a Hugging Face model folder (config.json) also stands for one.")]
ModelOption = Annotated[str | None, typer.Option(
    "--model", metavar="MODEL", hidden=True, show_default=False,
    help="Old spelling of the MODEL argument (deprecated).")]
CheckpointOption = Annotated[str | None, typer.Option(
    "--checkpoint", "-c", metavar="CKPT", show_default=False,
    help="Load these weights into the model first (any format tensorparity.open reads; strict).")]

# --- mappings -----------------------------------------------------------------------------------

MapOption = Annotated[str | None, typer.Option(
    "--map", "-m", metavar="MAP.yaml", show_default=False,
    help="Mapping file from the first side's keys to the second's: renames and layout transforms "
         "('tensorparity map suggest' writes one).")]
SaveMapOption = Annotated[Path | None, typer.Option(
    "--save-map", metavar="MAP.yaml", show_default=False,
    help="Without --map: write the mapping found from the two sides' parameters (YAML, for review and reuse).")]

# --- tolerances ---------------------------------------------------------------------------------

ExactOption = Annotated[bool, typer.Option("--exact", help="Bitwise: every byte must match.")]
AtolOption = Annotated[float | None, typer.Option(
    "--atol", metavar="X", show_default=False, help="Absolute tolerance (default: torch.testing's per dtype).")]
RtolOption = Annotated[float | None, typer.Option(
    "--rtol", metavar="Y", show_default=False, help="Relative tolerance (default: torch.testing's per dtype).")]
StatisticOption = Annotated[str, typer.Option(
    "--statistic", metavar="elementwise|max|mean", help="Judge every element, the largest error, or the mean error.")]
NanUnequalOption = Annotated[bool, typer.Option(
    "--nan-unequal", help="NaN never equals NaN (default: NaNs in the same places are equal).")]
TolOption = Annotated[list[str] | None, typer.Option(
    "--tol", metavar="REGEX=ATOL[,RTOL]", show_default=False,
    help="Tolerance for the keys matching REGEX; repeatable, first match wins.")]
NoiseFloorOption = Annotated[bool, typer.Option(
    "--noise-floor",
    help="Judge each layer by its own measured float32 noise (3x its float32-vs-float64 error), not a guessed "
         "atol: capture measures and stores it, compare uses the stored one, replay measures each module.")]

# --- what is read -------------------------------------------------------------------------------

KeysOption = Annotated[str | None, typer.Option(
    "--keys", "-k", metavar="REGEX", show_default=False, help="Only the keys matching this regular expression.")]
IncludeOption = Annotated[list[str] | None, typer.Option(
    "--include", "-i", metavar="REGEX", show_default=False,
    help="Only keys (or module paths) matching this regular expression; repeatable, any may match.")]
ExcludeOption = Annotated[list[str] | None, typer.Option(
    "--exclude", "-x", metavar="REGEX", show_default=False,
    help="Skip keys (or module paths) matching this regular expression; repeatable.")]
WeightsOnlyOption = Annotated[bool | None, typer.Option(
    "--weights-only/--all-keys", show_default=False,
    help="Model weights only, or every key. Default: weights only when one side is a bare state dict and the "
         "other a Lightning/NeMo/training checkpoint, else every key.")]
SeedOption = Annotated[int, typer.Option(
    "--seed", help="Seeds python, numpy and torch before every model build (and the input capture generates).")]

# --- what is written ----------------------------------------------------------------------------

OutputOption = Annotated[Path | None, typer.Option(
    "--output", "-o", metavar="PATH", show_default=False,
    help="Where to write (a new path; an existing one only with --overwrite).")]
OutOption = Annotated[Path | None, typer.Option(
    "--out", metavar="PATH", hidden=True, show_default=False, help="Old spelling of --output (deprecated).")]
OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output (written beside it, swapped in once complete); never an input.")]
ForceOption = Annotated[bool, typer.Option(
    "--force", hidden=True, help="Old spelling of --overwrite (deprecated).")]
FormatOption = Annotated[str | None, typer.Option(
    "--format", "-f", metavar="torch|safetensors|safetensors-sharded|dcp|nemo", show_default=False,
    help="Output format (default: from the output's suffix).")]
NoVerifyOption = Annotated[bool, typer.Option(
    "--no-verify", help="Skip proving the output before it is put in place (read back and compared with the "
                        "source, or a real StatefulDataLoader restarted from it).")]

# --- how the report is shown --------------------------------------------------------------------

JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print the report as one JSON document and nothing else (its 'schema' names the format).")]
TopOption = Annotated[int, typer.Option(
    "--top", metavar="N", help="Rows shown per list before folding the rest.")]
HtmlOption = Annotated[Path | None, typer.Option(
    "--html", metavar="FILE", show_default=False,
    help="Also write the report as one self-contained HTML file (opens offline; an existing file only with "
         "--overwrite).")]


# --- reading the options ------------------------------------------------------------------------

def _missing(param_hint: str, param_type: str) -> Exception:
    """click's own "Missing argument 'X'." usage error (exit 2), as if the parameter were required.
    typer >= 0.2x vendors click and older typer uses click itself: the module that holds
    BadParameter holds MissingParameter too."""
    missing: Any = getattr(sys.modules[typer.BadParameter.__module__], "MissingParameter")
    return missing(param_hint=param_hint, param_type=param_type)


def one_model(argument: str | None, option: str | None) -> str:
    """The MODEL argument, or its deprecated ``--model`` spelling; a usage error (exit 2) when
    both are given or neither.

    Example:
        >>> one_model("pkg.mod:build", None), one_model(None, "pkg.mod:build")
        ('pkg.mod:build', 'pkg.mod:build')
    """
    if argument is not None and option is not None:
        raise typer.BadParameter("give the model once: as the MODEL argument, or with the old --model, not both",
                                 param_hint="'MODEL'")
    if argument is None and option is None:
        raise _missing("'MODEL'", "argument")
    return argument if argument is not None else option  # type: ignore[return-value]


def one_output(output: Path | None, out: Path | None, *, required: bool = False) -> Path | None:
    """``-o/--output``, or its deprecated ``--out`` spelling; a usage error (exit 2) when both are
    given, or neither while ``required``.

    Example:
        >>> one_output(None, Path("t"))
        PosixPath('t')
    """
    if output is not None and out is not None:
        raise typer.BadParameter("give the output once: -o/--output, or the old --out, not both",
                                 param_hint="'--output'")
    if required and output is None and out is None:
        raise _missing("'--output' / '-o'", "option")
    return output if output is not None else out


def check_top(top: int) -> None:
    """Refuse a negative ``--top`` with the fix."""
    if top < 0:
        from tensorparity.errors import UsageError

        raise UsageError(f"--top must be 0 or more, not {top}", fix="pass e.g. --top 20")


def joined_pattern(patterns: list[str] | None) -> str | None:
    """Several ``--include``/``--exclude`` regular expressions as one (any may match), for the
    functions that take one; a single pattern is passed on as written.

    Example:
        >>> joined_pattern(["a", "b|c"]), joined_pattern(["a"]), joined_pattern(None)
        ('(?:a)|(?:b|c)', 'a', None)
    """
    if not patterns:
        return None
    if len(patterns) == 1:
        return patterns[0]
    return "|".join(f"(?:{p})" for p in patterns)


_STATISTICS = ("elementwise", "max", "mean")


def _number(text: str, what: str, spec: str) -> float:
    import math

    from tensorparity.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0) or math.isinf(value):
        raise UsageError(f"--tol {spec!r}: {what} {text!r} is not a number >= 0",
                         fix=r"write --tol 'REGEX=ATOL' or --tol 'REGEX=ATOL,RTOL', e.g. --tol '\.norm\.=1e-3,0'")
    return value


def parse_tolerance(
    *,
    exact: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    statistic: str = "elementwise",
    nan_unequal: bool = False,
    overrides: list[str] | None = None,
) -> Tolerance:
    """Build the :class:`~tensorparity.compare.Tolerance` the tolerance options describe.

    ``overrides`` are ``'REGEX=ATOL[,RTOL]'`` strings (the last ``=`` separates the numbers, so
    the regex may hold ``=``); an override keeps the statistic and NaN rule of the whole, and
    loosens its keys out of ``exact`` mode.

    Example:
        >>> import torch
        >>> parse_tolerance(atol=1e-4, overrides=[r"\\.norm\\.=1e-2"]).for_key("a.norm.w", torch.float32).atol
        0.01
    """
    from tensorparity.errors import UsageError
    from tensorparity.numerics import Tolerance

    if statistic not in _STATISTICS:
        raise UsageError(f"--statistic {statistic!r} is not one of {', '.join(_STATISTICS)}",
                         fix="pass --statistic elementwise, --statistic max or --statistic mean")
    if exact and (atol is not None or rtol is not None):
        raise UsageError("--exact compares bytes, so --atol/--rtol would be ignored",
                         fix="drop --atol/--rtol, or drop --exact; --tol 'REGEX=ATOL' loosens single keys")
    parsed = []
    for spec in overrides or []:
        pattern, sep, numbers = spec.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"--tol {spec!r} is not REGEX=ATOL[,RTOL]",
                             fix=r"write e.g. --tol '\.norm\.=1e-3' or --tol 'head\.=1e-3,1e-2'")
        parts = numbers.split(",")
        if len(parts) > 2:
            raise UsageError(f"--tol {spec!r} has {len(parts)} numbers after '='",
                             fix=r"give ATOL or ATOL,RTOL, e.g. --tol 'head\.=1e-3,1e-2'")
        o_atol = _number(parts[0], "atol", spec)
        o_rtol = _number(parts[1], "rtol", spec) if len(parts) == 2 else None
        parsed.append((pattern, Tolerance(atol=o_atol, rtol=o_rtol, equal_nan=not nan_unequal, statistic=statistic)))
    return Tolerance(atol=atol, rtol=rtol, exact=exact, equal_nan=not nan_unequal,
                     statistic=statistic, overrides=tuple(parsed))  # type: ignore[arg-type]
