"""Records of the data-loader state commands: what a state holds, and what a conversion did.

:class:`DataLoaderStateSummary` describes one state, legacy or torchdata, with the same fields,
so that a legacy folder and its converted file read side by side. :class:`DataLoaderStateConversion`
holds both summaries, the state itself, where it was written and how it was verified. Both print
for people (rich; ``str()`` is plain text) and for machines (``to_dict``/``to_json``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from functools import partialmethod
from typing import TYPE_CHECKING, Any

from tensorparity.report import render_report, report_html, report_json, report_text, rich_console
from tensorparity.report._render import (
    html_style,
    html_table,
    jsonable,
    rich_header,
    rich_titled_table,
    short_repr,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["CONVERSION_SCHEMA", "SUMMARY_SCHEMA", "DataLoaderStateConversion", "DataLoaderStateSummary",
           "WorkerSummary"]

SUMMARY_SCHEMA = "tensorparity.dataloader_state/1"
CONVERSION_SCHEMA = "tensorparity.dataloader_state_conversion/1"


@dataclass(frozen=True)
class WorkerSummary:
    """One reader of a loader state.

    Attributes:
        worker_id: the worker's index (0 is the main process when there are no workers).
        samples: samples it streamed this epoch (legacy states record it; torchdata's do not).
        position: where it restarts: an iterable dataset's position, ``None`` for map-style.
    """

    worker_id: int
    samples: int | None = None
    position: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "samples": self.samples, "position": jsonable(self.position)}


@dataclass(frozen=True)
class DataLoaderStateSummary:
    """What one data-loader state says, legacy layout or torchdata ``StatefulDataLoader`` state.

    Attributes:
        source: the file or folder it was read from (or ``"<memory>"``).
        layout: ``"legacy/1"`` or ``"torchdata"``.
        dataset_kind: ``"map"`` or ``"iterable"``.
        num_workers: loader worker processes (0: the main process reads).
        batches_in_epoch: batches already yielded this epoch.
        samples_in_epoch: samples already yielded this epoch.
        sampler: how the next samples are chosen, in words.
        workers: one entry per reader.
        epoch: the epoch (legacy states record it; torchdata's leave it to the training loop).
        global_step: batches since the start of training (legacy only).
        batch_size: samples per batch (legacy only; torchdata's state does not hold it).
        drop_last: whether an epoch's last short batch is dropped (legacy only).
        shuffle_seed: the seed of the legacy shuffle (legacy only).
        next_worker: the worker whose batch comes next (``None`` without workers).
        finished: whether the epoch's iterator already ended.
    """

    source: str
    layout: str
    dataset_kind: str
    num_workers: int
    batches_in_epoch: int
    samples_in_epoch: int | None
    sampler: str
    workers: tuple[WorkerSummary, ...]
    epoch: int | None = None
    global_step: int | None = None
    batch_size: int | None = None
    drop_last: bool | None = None
    shuffle_seed: int | None = None
    next_worker: int | None = None
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.dataloader_state/1", ...}``."""
        return {"schema": SUMMARY_SCHEMA, "source": self.source, "layout": self.layout,
                "dataset_kind": self.dataset_kind, "num_workers": self.num_workers, "epoch": self.epoch,
                "global_step": self.global_step, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shuffle_seed": self.shuffle_seed,
                "batches_in_epoch": self.batches_in_epoch, "samples_in_epoch": self.samples_in_epoch,
                "sampler": self.sampler, "next_worker": self.next_worker, "finished": self.finished,
                "workers": [w.to_dict() for w in self.workers]}

    @property
    def exit_code(self) -> int:
        """Always 0: the summary describes a state and judges nothing."""
        return 0

    to_json = report_json

    def rows(self) -> list[tuple[str, str]]:
        """(name, text) pairs: what the summary shows, in order."""
        def opt(value: Any) -> str:
            return "—" if value is None else str(value)

        readers = "main process" if self.num_workers == 0 else f"{self.num_workers} workers"
        kind = "map-style" if self.dataset_kind == "map" else self.dataset_kind
        return [("dataset", f"{kind}, {readers}"),
                ("epoch", opt(self.epoch)), ("global step", opt(self.global_step)),
                ("batch size", opt(self.batch_size)),
                ("batches in epoch", str(self.batches_in_epoch) + (" (epoch finished)" if self.finished else "")),
                ("samples in epoch", opt(self.samples_in_epoch)), ("sampler", self.sampler),
                ("next batch from", "main process" if self.next_worker is None else f"worker {self.next_worker}")]

    def renderable(self, *, top: int = 10) -> RenderableType:
        """The summary's rows, then one row per worker (``top`` is ignored: every worker is listed)."""
        from rich.console import Group
        from rich.text import Text

        title = Text(f"data-loader state ({self.layout}): {self.source}", style="bold")
        worker_rows = [(str(w.worker_id), "—" if w.samples is None else str(w.samples),
                        "—" if w.position is None else short_repr(w.position, 70)) for w in self.workers]
        return Group(title, rich_header(self.rows()), "",
                     *rich_titled_table("workers", ("worker", "samples", "position"), worker_rows,
                                        left=("position",)))

    def to_html(self) -> str:
        """A self-contained HTML fragment (what a notebook shows)."""
        rows = [[k, v] for k, v in self.rows()]
        workers = [[str(w.worker_id), "—" if w.samples is None else str(w.samples), short_repr(w.position, 70)]
                   for w in self.workers]
        return (f"<div class='tp-dls'>{html_style('tp-dls')}"
                + html_table(f"data-loader state ({self.layout}): {self.source}", ["", ""], rows)
                + html_table("workers", ["worker", "samples", "position"], workers) + "</div>")

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, width=100)


@dataclass(frozen=True)
class DataLoaderStateConversion:
    """What :func:`~tensorparity.dataloader.convert_dataloader_state` did.

    Attributes:
        source: the legacy state, summarised.
        result: the torchdata state, summarised.
        sampler: the sampler the new loader must use: ``"random"`` (``shuffle=True``),
            ``"distributed"`` (``StatefulDistributedSampler``) or ``"sequential"``.
        output: where the state was written (``None``: not written).
        verification: how the state was proven, or why it was not.
        notes: what the user should know (re-mapped workers, epochs after this one).
        state: the ``StatefulDataLoader`` state itself, ready for ``loader.load_state_dict``.
    """

    source: DataLoaderStateSummary
    result: DataLoaderStateSummary
    sampler: str
    output: str | None
    verification: str | None
    notes: tuple[str, ...] = ()
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def remapped(self) -> bool:
        """Whether the number of workers changed."""
        return self.source.num_workers != self.result.num_workers

    def loader_recipe(self) -> str:
        """The Python lines that build a loader this state restarts."""
        r, s = self.result, self.source
        args = f"dataset, batch_size={s.batch_size}"
        if self.sampler == "random":
            args += ", shuffle=True"
        elif self.sampler == "distributed":
            args += ", sampler=sampler"
        if r.num_workers:
            args += f", num_workers={r.num_workers}"
        lines = ["import torch", "from torchdata.stateful_dataloader import StatefulDataLoader"]
        if self.sampler == "distributed":
            lines = ["from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler", *lines,
                     "sampler = StatefulDistributedSampler(dataset, num_replicas=1, rank=0, "
                     f"shuffle={s.shuffle_seed is not None}, seed={s.shuffle_seed or 0})",
                     f"sampler.set_epoch({s.epoch})  # then set_epoch(epoch) before every later epoch"]
        if s.drop_last:
            args += ", drop_last=True"
        path = self.output or "state.pt"
        return "\n".join([*lines, f"loader = StatefulDataLoader({args})",
                          f"loader.load_state_dict(torch.load({path!r}, weights_only=True))"])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, ``{"schema": "tensorparity.dataloader_state_conversion/1", ...}``."""
        return {"schema": CONVERSION_SCHEMA, "output": self.output, "sampler": self.sampler,
                "remapped": self.remapped, "verification": self.verification, "notes": list(self.notes),
                "source": self.source.to_dict(), "result": self.result.to_dict(),
                "loader_recipe": self.loader_recipe()}

    @property
    def exit_code(self) -> int:
        """Always 0: a conversion that cannot be proven raises instead."""
        return 0

    to_json = report_json  # the state itself is not included: it is in the output file

    def summary(self) -> str:
        """One line: what was converted into what."""
        s, r = self.source, self.result
        workers = (f"{s.num_workers} -> {r.num_workers} workers (re-mapped)" if self.remapped
                   else f"{r.num_workers} workers")
        where = f", written to {self.output}" if self.output else ", not written"
        kind = "map-style" if s.dataset_kind == "map" else s.dataset_kind
        return (f"legacy epoch {s.epoch} step {s.batches_in_epoch} ({kind}) -> "
                f"StatefulDataLoader state, {r.batches_in_epoch} batches in, {workers}{where}")

    def renderable(self, *, top: int = 10) -> RenderableType:
        """Both states side by side, each worker, the verification and the lines that load the
        state (``top`` is ignored: every worker is listed)."""
        from rich.console import Group
        from rich.syntax import Syntax
        from rich.text import Text

        s, r = self.source, self.result
        rows = [(name, a, b) for (name, a), (_, b) in zip(s.rows(), r.rows())]
        parts: list[Any] = [Text(self.summary(), style="bold"), ""]
        parts += rich_titled_table(f"{s.source}  ->  {self.output or '(not written)'}",
                                   ("", "legacy", "StatefulDataLoader"), rows, left=("legacy", "StatefulDataLoader"))
        by_id = {w.worker_id: w for w in r.workers}
        worker_rows = []
        for i in range(max(len(s.workers), len(r.workers))):
            old = s.workers[i] if i < len(s.workers) else None
            new = by_id.get(i)
            worker_rows.append((str(i), "—" if old is None else str(old.samples),
                                "—" if old is None or old.position is None else short_repr(old.position, 50),
                                "—" if new is None else ("(sampler is global)" if new.position is None
                                                         else short_repr(new.position, 50))))
        parts.append("")
        parts += rich_titled_table("workers", ("worker", "samples streamed", "legacy position", "restarts at"),
                                   worker_rows, left=("legacy position", "restarts at"))
        check = self.verification or "not verified"
        parts += ["", Text("verified: ", style="bold").append(Text(check, style=""))]
        for note in self.notes:
            parts.append(Text(f"note: {note}", style="yellow"))
        parts += ["", Text("load it with:", style="bold"), Syntax(self.loader_recipe(), "python", theme="ansi_dark")]
        return Group(*parts)

    def __repr__(self) -> str:
        return f"<DataLoaderStateConversion {self.summary()}>"

    def to_html(self) -> str:
        """A self-contained HTML fragment (what a notebook shows)."""
        rows = [[name, a, b] for (name, a), (_, b) in zip(self.source.rows(), self.result.rows())]
        return (f"<div class='tp-dls'>{html_style('tp-dls')}"
                + html_table(self.summary(), ["", "legacy", "StatefulDataLoader"], rows)
                + f"<p>verified: {html.escape(self.verification or 'not verified')}</p></div>")

    render = render_report
    __rich_console__ = rich_console
    _repr_html_ = report_html
    __str__ = partialmethod(report_text, width=110)
