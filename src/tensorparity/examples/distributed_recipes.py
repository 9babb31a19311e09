"""A distributed recipe for the resume check: FSDP2 (or DDP) over a tiny MLP, AdamW, a warm-up
schedule, a ``DistributedSampler`` and dropout drawn from each rank's own torch RNG, saved and
loaded with ``torch.distributed.checkpoint`` (DCP).

Run it with ``tensorparity resume-check tensorparity.examples.distributed_recipes:DistributedRecipe
-n 6 -k 3 --nproc 2``: every leg runs under ``torchrun``, each rank runs :meth:`build` and
:meth:`step`, and :meth:`save`/:meth:`load` are called on every rank.

The checkpoint holds the model and optimizer as DCP state (``get_state_dict``/``set_state_dict``:
fully qualified names, resharded by DCP when the world size changes), the scheduler, and one
entry per rank (``rank<N>``) with what only that rank has: its RNG states and its data position.

* ``DistributedRecipe()`` is correct: it passes.
* ``ForgetsRank1Rng()`` (``DistributedRecipe(forget_rng_of_rank=1)``) leaves rank 1's torch RNG out of its checkpoint (and
  out of its load): rank 1's dropout masks change after a resume, and the check names rank 1.
* ``ReshardableRecipe()`` (no dropout) draws nothing from the per-rank RNGs, and its global batch
  is the same on any number of ranks: saved on 2 ranks it resumes on 1 (``--resume-nproc 1``).
* ``wrap="ddp"`` trains the same model under ``DistributedDataParallel`` instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorparity.resume.recipe import TrainingObjects
from tensorparity.resume.state import rng_state, set_rng_state

__all__ = ["GLOBAL_BATCH", "DistributedRecipe", "ForgetsRank1Rng", "ReshardableRecipe"]

GLOBAL_BATCH = 8  # samples per step over all ranks together: each rank takes GLOBAL_BATCH // world


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


@dataclass
class DistributedRecipe:
    """FSDP2 (``wrap="fsdp2"``) or DDP (``wrap="ddp"``) over ``8 -> 16 -> 3``, checkpointed with DCP.

    Attributes:
        dropout: dropout probability; its masks come from each rank's own torch RNG.
        forget_rng_of_rank: a rank whose torch RNG states (CPU and CUDA) are neither saved nor
            restored (a bug to find), or ``None``.
        wrap: ``fsdp2`` or ``ddp``.

    Example:
        >>> DistributedRecipe(forget_rng_of_rank=1).forget_rng_of_rank
        1
    """

    dropout: float = 0.1
    forget_rng_of_rank: int | None = None
    wrap: str = "fsdp2"

    def build(self) -> dict[str, Any]:
        rank, world = _world()
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(16, 3))
        if _distributed():  # under torchrun; one process without a process group trains the plain model
            model = self._wrap(model)
        # The model is built from the seed tensorparity set (the same on every rank); what each
        # rank draws afterwards (dropout) comes from a generator of its own.
        torch.manual_seed(1000 + rank)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(48, 8, generator=g), torch.randint(0, 3, (48,), generator=g))
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)
        return {"model": model, "optimizer": optimizer, "dataloader": loader,
                "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)}

    def _wrap(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist

        if self.wrap == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            model = model.cuda()
        fully_shard(model, mesh=init_device_mesh(device, (dist.get_world_size(),)))
        return model

    def step(self, objs: TrainingObjects, batch: Any) -> torch.Tensor:
        x, y = batch
        device = next(objs.model.parameters()).device
        objs.model.train()
        objs.optimizer.zero_grad()
        loss = F.cross_entropy(objs.model(x.to(device)), y.to(device))
        loss.backward()
        objs.optimizer.step()
        objs.scheduler.step()
        return loss

    def _local(self, objs: TrainingObjects) -> io.BytesIO:
        """What only this rank has (its RNG states, minus a forgotten one, and its data position),
        as one DCP bytes entry: DCP reshards tensors, not a rank's own generator."""
        rank, _ = _world()
        rng = rng_state()
        if rank == self.forget_rng_of_rank:
            rng.pop("torch")
            rng.pop("cuda", None)  # on a GPU, dropout draws from the CUDA generator
        buffer = io.BytesIO()
        torch.save({"rng": rng, "progress": objs.progress.state_dict()}, buffer)
        buffer.seek(0)
        return buffer

    def _state(self, objs: TrainingObjects, local: str) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(objs.model, objs.optimizer)
        return {"model": model, "optimizer": optimizer, "scheduler": objs.scheduler.state_dict(),
                local: self._local(objs)}

    def save(self, objs: TrainingObjects, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(objs, f"rank{_world()[0]}"), checkpoint_id=str(path))

    def load(self, objs: TrainingObjects, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        rank, _ = _world()
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        # Saved on fewer ranks: this rank has no entry of its own; it takes rank 0's data position
        # and keeps its freshly seeded RNG (which no checkpoint can give it).
        local = f"rank{rank}" if f"rank{rank}" in saved else "rank0"
        state = self._state(objs, local)
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(objs.model, objs.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        objs.scheduler.load_state_dict(state["scheduler"])
        state[local].seek(0)
        mine = torch.load(state[local], weights_only=True)
        objs.progress.load_state_dict(mine["progress"])
        if local == f"rank{rank}":
            set_rng_state(mine["rng"])


@dataclass
class ReshardableRecipe(DistributedRecipe):
    """:class:`DistributedRecipe` without dropout: nothing is drawn from a rank's own RNG, so a run
    saved on N ranks resumes on M (``--resume-nproc``)."""

    dropout: float = 0.0


@dataclass
class ForgetsRank1Rng(DistributedRecipe):
    """:class:`DistributedRecipe` whose checkpoint leaves out rank 1's torch RNG (a bug to find)."""

    forget_rng_of_rank: int | None = 1
