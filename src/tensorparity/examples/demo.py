"""The end-to-end demo (`make demo`): every capability adds its step here.

Step 1 — open anything: the bundled reference model is written in every format tensorparity
reads (plus a real Lightning training run and a checkpoint carrying a malicious payload), each is
opened lazily and safely, and the Lightning checkpoint is inspected.

Step 2 — diff: the bundled "port" of the model (other names, fused qkv) is diffed against the
reference through the bundled mapping, once as converted (passes) and once with one weight
deliberately broken (fails, naming the weight and the element).

Step 3 — suggest a mapping from tensor content alone, and prove it by diffing with it.

Step 4 — load-check: the reference's checkpoint loads into the port (through the mapping) and
into the reference (as is), strictly, and the two loaded models hold the same weights.

Step 5 — layer parity: the reference is captured forward and backward to a trace folder, the port
with a subtle bug (LayerNorm eps 1e-3 in one block) is captured in memory and compared through the
mapping; the report names the first diverging layer, replay confirms it is that layer's own error
(every module fed the reference's recorded inputs), and the HTML report is written.

Step 6 — distributed: one DDP training step on 2 CPU ranks (gloo) is captured under ``torchrun``
with the gradient all-reduce and under ``no_sync()``; compared rank by rank, the gradients the
optimizer steps on differ on every rank, and the forward pass matches.

Step 7 — resume check: a tiny training recipe is resumed in a fresh process mid-epoch and at an
epoch boundary (bitwise the same as uninterrupted training), then a recipe whose checkpoint
forgets the optimizer state is caught, the missing state named, and the diagnosis confirmed.

Step 8 — migrate: an "old release" checkpoint of the model (old names, fused qkv, a scheduler
never stepped) is migrated with a dry run first, then in place (atomic, with a backup), then
diffed against the current layout (identical); a second run finds nothing to do.

Step 9 — data-loader state: an old run's loader state files are converted to torchdata's
``StatefulDataLoader`` state, re-mapped from 2 to 3 workers, and a real loader resumes with
exactly the batches the old run would have yielded; an iterable dataset's re-map is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import tensorparity
from tensorparity.examples import distributed_demo, legacy_loader, old_release, reference_model, resume_recipes
from tensorparity.examples.formats import write_formats

OUT = Path(os.environ.get("TENSORPARITY_DEMO_DIR", "demo-output"))


class Payload:
    """Stands for a malicious object: unpickling it with pickle.load would run a shell command."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"echo pwned > {OUT / 'PWNED'}",))


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's banner lines are not what the demo is about."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def step_open(console: Console) -> None:
    console.rule("[bold]1. open anything — lazily, safely")
    with warnings.catch_warnings(), _quiet_lightning():
        warnings.simplefilter("ignore")
        paths = write_formats(reference_model(), OUT / "formats")
        try:
            from tensorparity.examples.lightning_run import train_lightning

            paths["lightning"] = train_lightning(OUT / "formats" / "run.ckpt", steps=3)
        except tensorparity.TensorParityError as exc:  # the lightning extra is optional
            console.print(f"[yellow]skipping Lightning: {exc}")
    malicious = OUT / "formats" / "malicious.pt"
    torch.save({"weights": reference_model().state_dict(), "payload": Payload()}, malicious)
    paths["malicious"] = malicious

    table = Table("written as", "opened as", "tensors", "elements", "bytes", "open ms", "not executed")
    for name, path in paths.items():
        start = time.perf_counter()
        with tensorparity.open(path) as ckpt:
            ms = (time.perf_counter() - start) * 1e3
            table.add_row(name, ckpt.format, str(sum(1 for _ in ckpt.tensors())),
                          f"{ckpt.num_parameters():,}", f"{ckpt.nbytes():,}", f"{ms:.1f}",
                          ", ".join(p.name for p in ckpt.placeholders) or "-")
    console.print(table)
    pwned = (OUT / "PWNED").exists()
    console.print(f"payload executed: [bold]{'YES — BUG' if pwned else 'no'}[/] (the marker file "
                  f"{'exists' if pwned else 'was never written'})")
    if pwned:
        raise SystemExit(2)
    if "lightning" in paths:
        console.rule("[bold]tensorparity inspect run.ckpt  (the same as the CLI command)")
        tensorparity.inspect(paths["lightning"], top=5, keys=r"^(state_dict|hyper_parameters|epoch|global_step)").render(console)


def step_diff(console: Console) -> None:
    console.rule("[bold]2. diff the port against the reference, through a mapping")
    from importlib.resources import files

    from safetensors.torch import save_file

    from tensorparity.examples import port_model

    folder = OUT / "diff"
    folder.mkdir(parents=True, exist_ok=True)
    mapping = str(files("tensorparity.examples") / "reference_to_port.yaml")
    torch.save(reference_model().state_dict(), folder / "reference.pt")
    port = {k: v.contiguous() for k, v in port_model().state_dict().items()}
    save_file(port, str(folder / "port.safetensors"))
    port["blocks.1.qkv.weight"] = port["blocks.1.qkv.weight"].clone()
    port["blocks.1.qkv.weight"][70, 3] += 0.5  # a broken weight: one element of the fused v projection
    save_file(port, str(folder / "port-broken.safetensors"))
    for name in ("port.safetensors", "port-broken.safetensors"):
        console.print(f"[bold]$ tensorparity diff reference.pt {name} --map reference_to_port.yaml")
        report = tensorparity.diff(folder / "reference.pt", folder / name, mapping=mapping, progress=False)
        report.render(console)
        expected = name == "port.safetensors"
        if report.passed != expected:
            raise SystemExit(f"demo: diff of {name} should have {'passed' if expected else 'failed'}")


def step_suggest(console: Console) -> None:
    console.rule("[bold]3. suggest a mapping from tensor content")
    from tensorparity.mapping import Mapping, suggest_mapping

    folder = OUT / "diff"
    console.print("[bold]$ tensorparity map suggest reference.pt port.safetensors -o suggested.yaml")
    suggestion = suggest_mapping(folder / "reference.pt", folder / "port.safetensors", progress=False)
    (folder / "suggested.yaml").write_text(suggestion.to_yaml())
    console.print(suggestion.summary())
    report = tensorparity.diff(folder / "reference.pt", folder / "port.safetensors",
                               mapping=Mapping.from_yaml(folder / "suggested.yaml"), progress=False)
    console.print(f"diff with the suggested mapping, no hand edits: {report.classic_summary()}", soft_wrap=True)
    if not report.passed:
        raise SystemExit("demo: the suggested mapping should make diff pass")


def step_load_check(console: Console) -> None:
    console.rule("[bold]4. load-check: into the port and into the reference")
    from importlib.resources import files

    from tensorparity.examples import port_model

    console.print("[bold]$ tensorparity load-check reference.pt tensorparity.examples:port_model "
                  "--reference tensorparity.examples:reference_model --map reference_to_port.yaml")
    report = tensorparity.load_check(OUT / "diff" / "reference.pt", model=port_model, reference=reference_model,
                                     mapping=str(files("tensorparity.examples") / "reference_to_port.yaml"))
    report.render(console)
    if not report.passed:
        raise SystemExit("demo: the reference checkpoint should load into both models")


def step_parity(console: Console) -> None:
    console.rule("[bold]5. layer parity: the port with a subtle bug, forward and backward")
    from importlib.resources import files

    from tensorparity.examples import port_model
    from tensorparity.examples.port import BUGS
    from tensorparity.trace import capture, compare_traces, reproducible
    from tensorparity.trace._replay import replay
    from tensorparity.trace._trace_report_html import render_trace_html

    folder = OUT / "parity"
    folder.mkdir(parents=True, exist_ok=True)
    mapping = str(files("tensorparity.examples") / "reference_to_port.yaml")
    features = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(0))
    bug = "norm_eps"
    console.print(f"capture the reference (outputs, inputs, gradients) to {folder / 'reference'}; capture the port "
                  f"in memory, with a bug: {BUGS[bug]}")
    traces = {}
    with reproducible(0):
        for name, model in (("reference", reference_model()), ("port", port_model(bug=bug))):
            out = folder / "reference" if name == "reference" else None  # the port's trace stays in memory
            if out is not None and out.exists():
                shutil.rmtree(out)  # a rerun of the demo replaces the previous trace
            with capture(model, inputs=True, out=out) as trace:
                model(features).sum().backward()
            traces[name] = trace
    console.print("[bold]compare_traces(reference, port, mapping=reference_to_port.yaml)")
    report = compare_traces(folder / "reference", traces["port"], mapping=mapping)
    report.render(console, top=5)
    first = report.first_divergence
    if first is None or first.layer_b != "blocks.1.mlp_norm":
        raise SystemExit(f"demo: the first divergence should be blocks.1.mlp_norm, not {first and first.layer_b}")
    html_path = folder / "report.html"
    html_path.write_text(render_trace_html(report), encoding="utf-8")
    console.print(f"HTML report (one file, opens offline): [bold]{html_path}")

    console.print("[bold]replay: every module of the buggy port fed the reference's recorded inputs")
    replayed = replay(folder / "reference", port_model(bug=bug), mapping=mapping)
    console.print(replayed.summary(), soft_wrap=True)
    culprits = [x.module for x in replayed.culprits]
    if culprits != ["blocks.1.mlp_norm"]:
        raise SystemExit(f"demo: replay should isolate blocks.1.mlp_norm, not {culprits}")

    console.print("[bold]compare_traces(reference, correct port) with no mapping: found from the traces' parameters; "
                  "the port's fused qkv compared with the reference's q, k, v outputs concatenated")
    with reproducible(0):
        correct = port_model()
        with capture(correct) as port_trace:
            correct(features).sum().backward()
    found = compare_traces(folder / "reference", port_trace)
    console.print(found.summary(), soft_wrap=True)
    for layer in found.layers:
        if layer.layout:
            console.print(f"  {layer.label}: {layer.layout}", soft_wrap=True, markup=False, highlight=False)
    if not found.passed or found.found_mapping is None:
        raise SystemExit(f"demo: the correct port should match through the mapping found: {found.summary()}")
    found_path = folder / "found-mapping.yaml"
    found_path.write_text(found.found_mapping.to_yaml(), encoding="utf-8")
    console.print(f"the mapping found (tensorparity compare ... --save-map FILE): [bold]{found_path}")


def main() -> None:
    console = Console(width=None if sys.stdout.isatty() else 110)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "PWNED").unlink(missing_ok=True)
    step_open(console)
    step_diff(console)
    step_suggest(console)
    step_load_check(console)
    step_parity(console)
    distributed_demo.step(console, OUT)
    resume_recipes.step(console, OUT)
    old_release.step(console, OUT)
    legacy_loader.step(console, OUT)
    console.rule("[bold green]demo finished")


if __name__ == "__main__":
    sys.exit(main())
