"""Recipes the resume tests use besides the bundled examples: bad inputs, a stateful data
loader, an accumulating recipe that forgets its gradients, a tiny optimizer-free recipe, and
checkpoints whose diagnosis needs the right reason (an adapter-only checkpoint whose base load()
re-initialises, hyper-parameters a config overwrites after the load, a non-persistent buffer).

Named by path (``f"{HERE}:Name"``), as a user would name a recipe file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorparity.examples.resume_recipes import (
    AccumulatingRecipe,
    LoraRecipe,
    NoisyFeatures,
    TinyDefaultRecipe,
    TinyModel,
    TinyRecipe,
)
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


class LoraRebuiltOnLoad(LoraRecipe):
    """Adapter-only checkpoint; load() first re-creates the frozen base the way a script that builds
    the model again does (every Linear/Conv re-initialised), under its own config's seed (1; build()
    ran under 0), then loads the adapters with strict=False."""

    def load(self, objs: Any, path: Path) -> None:
        torch.manual_seed(1)
        for module in objs.model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.reset_parameters()
        super().load(objs, path)


class ConfigOverwritesOptimizer(TinyRecipe):
    """Restores everything, then applies the run's config to the optimizer's param groups (lr and
    weight decay), as a script that configures the optimizer after loading does. Training warms the
    lr up (LambdaLR) and decays the weight decay every step, so at the resume point both differ from
    the config's starting values."""

    config = {"lr": 3e-3, "weight_decay": 0.05}

    def build(self) -> dict[str, Any]:
        built = super().build()
        for group in built["optimizer"].param_groups:
            group["weight_decay"] = self.config["weight_decay"]
        return built

    def step(self, objs: Any, batch: Any) -> torch.Tensor:
        loss = super().step(objs, batch)
        for group in objs.optimizer.param_groups:  # a weight-decay schedule
            group["weight_decay"] *= 0.5
        return loss

    def load(self, objs: Any, path: Path) -> None:
        super().load(objs, path)
        for group in objs.optimizer.param_groups:
            group.update(self.config)


class InputNorm(nn.Module):
    """Normalises the features by running statistics kept in buffers registered with
    ``persistent=False`` (so ``state_dict()`` leaves them out)."""

    def __init__(self, n: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(n, 1), persistent=False)
        self.register_buffer("running_var", torch.ones(n, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(x.mean(dim=(0, 2)).unsqueeze(-1), self.momentum)
                self.running_var.lerp_(x.var(dim=(0, 2)).unsqueeze(-1), self.momentum)
        return (x - self.running_mean) / (self.running_var + 1e-5).sqrt()


class NormedModel(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.input_norm = InputNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_norm(x))


class NonPersistentStats(TinyRecipe):
    """:class:`TinyRecipe` (saves ``model.state_dict()``) on a model whose input statistics are
    non-persistent buffers: the checkpoint cannot hold them."""

    def build(self) -> dict[str, Any]:
        return _tiny_objects(NormedModel())


class NonPersistentCache(TinyRecipe):
    """A non-persistent buffer filled lazily on the first forward (a cache): it differs right after
    the load, but the run is exact."""

    def build(self) -> dict[str, Any]:
        model = TinyModel()
        model.register_buffer("scale_cache", torch.zeros(1), persistent=False)

        def fill(module: nn.Module, args: Any) -> None:
            module.scale_cache.fill_(2.0)

        model.register_forward_pre_hook(fill)
        return _tiny_objects(model)


def _tiny_objects(model: nn.Module) -> dict[str, Any]:
    """What TinyRecipe builds, around another model."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return {"model": model, "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: min(1.0, (epoch + 1) / 5)),
            "dataloader": torch.utils.data.DataLoader(NoisyFeatures(), batch_size=4, shuffle=True),
            "extras": {"ema": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))}}


def custom_runner(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A leg runner of one's own (as a framework integration would write): reports its process."""
    return [{"name": leg["name"], "pid": os.getpid(), "cwd": os.getcwd(),
             "tensorparity_vars": sorted(k for k in os.environ if k.upper().startswith("TENSORPARITY"))}
            for leg in job["legs"]]


def dying_runner(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A leg whose process dies without a word (a crash in an extension, the OOM killer)."""
    print("about to crash", flush=True)
    os.abort()
