"""Recipes the resume tests use besides the bundled examples: bad inputs, a stateful data
loader, an accumulating recipe that forgets its gradients, and a tiny optimizer-free recipe.

Named by path (``f"{HERE}:Name"``), as a user would name a recipe file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorparity.examples.resume_recipes import AccumulatingRecipe, NoisyFeatures, TinyDefaultRecipe
from tensorparity.resume.state import capture, restore

HERE = Path(__file__).resolve()


def spec(name: str) -> str:
    return f"{HERE}:{name}"


class ManualRecipe:
    """A 21-parameter MLP trained with a hand-written SGD update (no torch.optim), shuffled data."""

    def build(self) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g))
        return {"model": nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
                "dataloader": torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)}

    def step(self, objs: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        for p in objs.model.parameters():
            p.grad = None
        loss = F.mse_loss(objs.model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in objs.model.parameters():
                p -= 0.1 * p.grad
        return loss


class FailsToBuild(ManualRecipe):
    def build(self) -> dict[str, Any]:
        raise ValueError("no such dataset: /data/train")


class FailsToStep(ManualRecipe):
    def step(self, objs: Any, batch: Any) -> torch.Tensor:
        if objs.progress.step == 3:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return super().step(objs, batch)


class SavesNothing(ManualRecipe):
    def save(self, objs: Any, path: Path) -> None:
        pass

    def load(self, objs: Any, path: Path) -> None:
        pass


class LoadRaises(ManualRecipe):
    def save(self, objs: Any, path: Path) -> None:
        torch.save({"model": objs.model.state_dict()}, path)

    def load(self, objs: Any, path: Path) -> None:
        objs.model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])


class RunsShort(ManualRecipe):
    """Its data loader is a generator: one pass, then nothing."""

    def build(self) -> dict[str, Any]:
        built = super().build()
        built["dataloader"] = (batch for batch in built["dataloader"])
        return built


class Nondeterministic(ManualRecipe):
    """Adds a pinch of OS entropy to the loss: two uninterrupted runs differ."""

    def step(self, objs: Any, batch: Any) -> torch.Tensor:
        return super().step(objs, batch) + int.from_bytes(os.urandom(2), "little") * 1e-3


_BUILDS = 0


class ModuleCounter(ManualRecipe):
    """Keeps state outside its objects: every build in one process sees other data."""

    def build(self) -> dict[str, Any]:
        global _BUILDS
        _BUILDS += 1
        built = super().build()
        built["dataloader"] = [(x + _BUILDS, y) for x, y in built["dataloader"]]
        return built


class EnvProbe(ManualRecipe):
    """Refuses to build where a tensorparity variable leaked into the environment."""

    def build(self) -> dict[str, Any]:
        leaked = sorted(k for k in os.environ if k.upper().startswith("TENSORPARITY"))
        if leaked:
            raise RuntimeError(f"leaked into the fresh process: {leaked}")
        return super().build()


class NotARecipe:
    def step(self, objs: Any, batch: Any) -> None:
        pass


class StatefulLoader(TinyDefaultRecipe):
    """The tiny recipe on torchdata's StatefulDataLoader; tensorparity's default checkpoint."""

    def build(self) -> dict[str, Any]:
        from torchdata.stateful_dataloader import StatefulDataLoader

        built = super().build()
        built["dataloader"] = StatefulDataLoader(NoisyFeatures(), batch_size=4, shuffle=True)
        return built


class StatefulForgetsLoader(StatefulLoader):
    """Saves everything but the data loader's own state."""

    def save(self, objs: Any, path: Path) -> None:
        state = capture(objs)
        del state["data"]["loader"]
        torch.save(state, path)

    def load(self, objs: Any, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        restore(objs, state)


class AccumulatingForgetsGrads(AccumulatingRecipe):
    """Saves everything but the gradients accumulated so far."""

    def save(self, objs: Any, path: Path) -> None:
        torch.save(capture(objs, inside_group=False), path)

    def load(self, objs: Any, path: Path) -> None:
        restore(objs, torch.load(path, weights_only=True))


def custom_runner(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A leg runner of one's own (as a framework integration would write): reports its process."""
    return [{"name": leg["name"], "pid": os.getpid(), "cwd": os.getcwd(),
             "tensorparity_vars": sorted(k for k in os.environ if k.upper().startswith("TENSORPARITY"))}
            for leg in job["legs"]]


def dying_runner(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A leg whose process dies without a word (a crash in an extension, the OOM killer)."""
    print("about to crash", flush=True)
    os.abort()
