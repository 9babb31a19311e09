"""Recipes for the resume check: a correct one, forgetful ones, and the demo step.

All train a tiny variant of the bundled reference model (one transformer layer, width 8, with
dropout on its input: about 1,100 parameters) on 24 random "spectrograms" whose data pipeline draws
from numpy (noise) and python's ``random`` (a time shift) — so every kind of state matters:
weights, AdamW moments, a warm-up schedule, an EMA, the torch/numpy/python RNGs and the shuffled
data loader's position.

* :class:`TinyRecipe` saves and loads everything with its own code: it passes.
* :class:`TinyDefaultRecipe` has no save/load: tensorparity's default checkpoint is used.
* :class:`Forgetful` is :class:`TinyRecipe` with one piece of state left out of its checkpoint
  (``Forgetful(forget="optimizer")``), or loaded with ``strict=False`` from renamed keys.
* :class:`LoraRecipe` trains low-rank adapters on a frozen base and saves only the adapters,
  loading them with ``strict=False`` into a freshly built base: correct, so it passes.
* :class:`AccumulatingRecipe` accumulates gradients over 2 micro-batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tensorparity.examples.reference import ReferenceModel
from tensorparity.resume.recipe import TrainingObjects
from tensorparity.resume.state import rng_state, set_rng_state

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["FORGETTABLE", "AccumulatingRecipe", "Forgetful", "LoraRecipe", "NoisyFeatures", "TinyDefaultRecipe",
           "TinyModel", "TinyRecipe", "step"]

FORGETTABLE = ("optimizer", "scheduler", "torch_rng", "numpy_rng", "python_rng", "progress", "ema", "strict")


class NoisyFeatures(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random features ``(4, 8)`` and frame labels ``(4,)``; each read adds numpy noise and a
    random shift from python's ``random``, as augmentation pipelines do."""

    def __init__(self, n: int = 24, n_mels: int = 4, time: int = 8, n_classes: int = 3) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, n_mels, time, generator=g)
        self.y = torch.randint(0, n_classes, (n, time // 2), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.from_numpy(np.random.normal(0.0, 0.1, size=tuple(self.x[i].shape)).astype(np.float32))
        return torch.roll(self.x[i] + noise, random.randint(0, 1), dims=-1), self.y[i]


class TinyModel(nn.Module):
    """The reference model at width 8 with one layer, behind input dropout."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)
        self.net = ReferenceModel(n_mels=4, dim=8, heads=2, layers=1, n_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.drop(x))


def _warmup(epoch: int) -> float:
    return min(1.0, (epoch + 1) / 5)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _optimizer_step(objs: TrainingObjects, batch: Any) -> torch.Tensor:
    objs.model.train()
    objs.optimizer.zero_grad()
    loss = _loss(objs.model, batch)
    loss.backward()
    objs.optimizer.step()
    objs.scheduler.step()
    return loss


class TinyDefaultRecipe:
    """Model, AdamW, warm-up schedule, EMA, shuffled loader; no save/load of its own."""

    def build(self) -> dict[str, Any]:
        model = TinyModel()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        return {"model": model, "optimizer": optimizer,
                "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup),
                "dataloader": torch.utils.data.DataLoader(NoisyFeatures(), batch_size=4, shuffle=True),
                "extras": {"ema": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))}}

    def step(self, objs: TrainingObjects, batch: Any) -> torch.Tensor:
        loss = _optimizer_step(objs, batch)
        objs.extras["ema"].update_parameters(objs.model)
        return loss


class TinyRecipe(TinyDefaultRecipe):
    """:class:`TinyDefaultRecipe` with a correct checkpoint of its own (one ``torch.save`` file)."""

    def save(self, objs: TrainingObjects, path: Path) -> None:
        torch.save({"model": objs.model.state_dict(), "optimizer": objs.optimizer.state_dict(),
                    "scheduler": objs.scheduler.state_dict(), "ema": objs.extras["ema"].state_dict(),
                    "progress": objs.progress.state_dict(), "rng": rng_state()}, path)

    def load(self, objs: TrainingObjects, path: Path) -> None:
        ckpt = torch.load(path, weights_only=True)
        objs.model.load_state_dict(ckpt["model"])
        objs.optimizer.load_state_dict(ckpt["optimizer"])
        objs.scheduler.load_state_dict(ckpt["scheduler"])
        objs.extras["ema"].load_state_dict(ckpt["ema"])
        objs.progress.load_state_dict(ckpt["progress"])
        set_rng_state(ckpt["rng"])


@dataclass
class Forgetful(TinyRecipe):
    """:class:`TinyRecipe` whose checkpoint leaves out one thing (see :data:`FORGETTABLE`):
    ``strict`` saves the classifier under an older name (``head``) and loads with
    ``strict=False``, so two keys are silently skipped."""

    forget: str = "optimizer"

    def __post_init__(self) -> None:
        if self.forget not in FORGETTABLE:
            raise ValueError(f"forget must be one of {', '.join(FORGETTABLE)}, not {self.forget!r}")

    def save(self, objs: TrainingObjects, path: Path) -> None:
        rng = rng_state()
        model = objs.model.state_dict()
        if self.forget == "strict":
            model = {k.replace("net.decoder.", "net.head."): v for k, v in model.items()}
        ckpt = {"model": model, "optimizer": objs.optimizer.state_dict(), "scheduler": objs.scheduler.state_dict(),
                "ema": objs.extras["ema"].state_dict(), "progress": objs.progress.state_dict(), "rng": rng}
        if self.forget in ("torch_rng", "numpy_rng", "python_rng"):
            del rng[self.forget.removesuffix("_rng")]
        elif self.forget != "strict":
            del ckpt[self.forget]
        torch.save(ckpt, path)

    def load(self, objs: TrainingObjects, path: Path) -> None:
        ckpt = torch.load(path, weights_only=True)
        objs.model.load_state_dict(ckpt["model"], strict=self.forget != "strict")
        for name, obj in (("optimizer", objs.optimizer), ("scheduler", objs.scheduler), ("ema", objs.extras["ema"]),
                          ("progress", objs.progress)):
            if name in ckpt:
                obj.load_state_dict(ckpt[name])
        set_rng_state(ckpt["rng"])


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B @ A``."""

    def __init__(self, base: nn.Linear, rank: int = 2, alpha: float = 4.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


class LoraRecipe:
    """Adapters on q and v of a frozen :class:`TinyModel`; the checkpoint holds only the adapters
    (plus optimizer, schedule, position, RNG), loaded with ``strict=False`` into a base rebuilt
    from the same seed. Correct: the skipped base keys hold the same values anyway."""

    def build(self) -> dict[str, Any]:
        model = TinyModel().requires_grad_(False)
        attn = model.net.layers[0].self_attn
        attn.q_proj, attn.v_proj = LoRALinear(attn.q_proj), LoRALinear(attn.v_proj)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return {"model": model, "optimizer": optimizer,
                "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup),
                "dataloader": torch.utils.data.DataLoader(NoisyFeatures(), batch_size=4, shuffle=True)}

    def step(self, objs: TrainingObjects, batch: Any) -> torch.Tensor:
        return _optimizer_step(objs, batch)

    def save(self, objs: TrainingObjects, path: Path) -> None:
        adapters = {k: v for k, v in objs.model.state_dict().items() if ".lora_" in k}
        torch.save({"adapters": adapters, "optimizer": objs.optimizer.state_dict(),
                    "scheduler": objs.scheduler.state_dict(), "progress": objs.progress.state_dict(),
                    "rng": rng_state()}, path)

    def load(self, objs: TrainingObjects, path: Path) -> None:
        ckpt = torch.load(path, weights_only=True)
        objs.model.load_state_dict(ckpt["adapters"], strict=False)
        objs.optimizer.load_state_dict(ckpt["optimizer"])
        objs.scheduler.load_state_dict(ckpt["scheduler"])
        objs.progress.load_state_dict(ckpt["progress"])
        set_rng_state(ckpt["rng"])


class AccumulatingRecipe(TinyDefaultRecipe):
    """Gradients accumulated over 2 micro-batches; tensorparity's default checkpoint."""

    accumulate = 2

    def step(self, objs: TrainingObjects, batch: Any) -> torch.Tensor:
        objs.model.train()
        loss = _loss(objs.model, batch)
        (loss / self.accumulate).backward()
        return loss

    def update(self, objs: TrainingObjects) -> None:
        objs.optimizer.step()
        objs.scheduler.step()
        objs.extras["ema"].update_parameters(objs.model)
        objs.optimizer.zero_grad()


def step(console: Console, out: Path) -> None:
    """The demo's resume step: the tiny recipe resumed at a mid-epoch step and at an epoch
    boundary (passes), then a recipe whose checkpoint forgets the optimizer (named, confirmed);
    its HTML report is written to ``out/resume-report.html``."""
    from tensorparity.resume import resume_check

    console.rule("[bold]resume check — save, fresh process, load, continue")
    good = resume_check(TinyRecipe, steps=8, resume_at=[3, 6], confirm=False)
    good.render(console, top=8)
    bad = resume_check(Forgetful(forget="optimizer"), steps=8, resume_at=3)
    bad.render(console, top=8)
    out.mkdir(parents=True, exist_ok=True)
    (out / "resume-report.html").write_text(bad.to_html(), encoding="utf-8")
    console.print(f"HTML report: {out / 'resume-report.html'}")
