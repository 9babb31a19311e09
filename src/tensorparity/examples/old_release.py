"""An "old release" of the bundled example model, and the migrations that bring its checkpoints
to the current layout: used by the demo, the tests and ``docs/migrate.md``.

Release 1.0 wrote training checkpoints ``{"release": "1.0", "model": ..., "optimizer": ...,
"scheduler": ..., "global_step": ..., "epoch": ...}`` whose model section named the front end
``frontend.conv``, fused each layer's q/k/v projections into one ``qkv``, and whose scheduler
was never stepped (``last_epoch`` stuck at 0). The migrations exist twice, as data:
``old_release.yaml`` (:data:`SPEC`) and the Python registry :data:`MIGRATIONS` (the same three
migrations, written with the Python API).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tensorparity.examples.reference import reference_model
from tensorparity.mapping import Mapping, Rule, Split
from tensorparity.migrate.functions import recompute_last_epoch
from tensorparity.migrate.registry import Migration, Registry

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["GLOBAL_STEP", "MIGRATIONS", "SPEC", "STEPS_PER_EPOCH", "old_release_state", "step", "write_old_release"]

SPEC = Path(str(files("tensorparity.examples") / "old_release.yaml"))
GLOBAL_STEP = 30
STEPS_PER_EPOCH = 10

MIGRATIONS = Registry("reference-model", [
    Migration("1.5", "rename-front-end", mapping=Mapping([Rule("model.frontend.conv.{p}", "model.pre_encode.{p}")]),
              inverse="auto", description="the front end moved from frontend.conv to pre_encode"),
    Migration("1.5", "split-qkv", inverse="auto", description="the fused attention projection became q_proj, "
                                                              "k_proj and v_proj",
              mapping=Mapping([Rule("model.layers.{i}.self_attn.qkv.{p}",
                                    [f"model.layers.{{i}}.self_attn.{x}_proj.{{p}}" for x in "qkv"], Split(0, parts=3))])),
    Migration("2.0", "scheduler-epoch", function=recompute_last_epoch(scheduler="scheduler", step="global_step",
                                                                      steps_per_epoch=STEPS_PER_EPOCH),
              description="1.x never stepped the scheduler per epoch; recompute its epoch from the global step"),
], version_field="release", current="2.0")


def old_release_state(state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The reference model's weights in release 1.0's layout (``frontend.conv``, fused ``qkv``).

    Example:
        >>> sorted(k for k in old_release_state() if k.startswith("layers.0.self_attn"))[:2]
        ['layers.0.self_attn.out_proj.bias', 'layers.0.self_attn.out_proj.weight']
    """
    state = dict(state if state is not None else reference_model().state_dict())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("pre_encode."):
            out["frontend.conv." + key.removeprefix("pre_encode.")] = value
        elif ".self_attn.q_proj." in key:
            p = key.rsplit(".", 1)[-1]
            base = key.split(".self_attn.")[0] + ".self_attn."
            out[f"{base}qkv.{p}"] = torch.cat([state[f"{base}{x}_proj.{p}"] for x in "qkv"])
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        else:
            out[key] = value
    return out


def write_old_release(path: Path) -> Path:
    """Write a release-1.0 training checkpoint of the reference model with ``torch.save``.

    The optimizer state is real (AdamW after one step of a copy of the model, so that the
    weights stay the reference's); the scheduler is a real ``StepLR`` that was never stepped.

    Example:
        >>> import tempfile, tensorparity
        >>> ckpt = tensorparity.open(write_old_release(Path(tempfile.mkdtemp()) / "run_v1.pt"))
        >>> ckpt["release"].value, ckpt["scheduler.last_epoch"].value, ckpt["global_step"].value
        ('1.0', 0, 30)
    """
    trained = reference_model()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    features = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    trained(features).square().mean().backward()
    optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"release": "1.0", "model": old_release_state(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "global_step": GLOBAL_STEP,
                "epoch": GLOBAL_STEP // STEPS_PER_EPOCH}, path)
    return path


def step(console: Console, out: Path) -> None:
    """The demo's migrate step: an old release's checkpoint, dry run first, then in place, then
    diffed against the current model; a second run finds nothing to do."""
    import tensorparity
    from tensorparity.migrate import migrate

    console.rule("[bold]migrate an old release's checkpoint: dry run, in place, diff")
    folder = out / "migrate"
    path = write_old_release(folder / "run_v1.pt")
    console.print("[bold]$ tensorparity migrate run_v1.pt --migrations old_release.yaml --dry-run")
    migrate(path, SPEC, dry_run=True).render(console, top=3)
    console.print("[bold]$ tensorparity migrate run_v1.pt --migrations old_release.yaml --in-place --backup")
    report = migrate(path, SPEC, in_place=True, backup=True)
    console.print(report.summary(), soft_wrap=True)
    if not report.verified:
        raise SystemExit("demo: the migrated checkpoint should verify bitwise")
    console.print("[bold]$ tensorparity diff run_v1.pt reference.pt[/]   (the current model's own state dict)")
    diff = tensorparity.diff(path, reference_model().state_dict(), progress=False)
    console.print(diff.classic_summary(), soft_wrap=True)
    if diff.verdict != "identical":
        raise SystemExit("demo: the migrated weights should be identical to the current layout's")
    again: Any = migrate(path, SPEC)
    console.print(f"[bold]$ tensorparity migrate run_v1.pt --migrations old_release.yaml[/]  -> {again.summary()}",
                  soft_wrap=True)
