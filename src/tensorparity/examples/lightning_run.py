"""A real Lightning training run of the reference model, for checkpoints with every section
(weights, optimizer, scheduler, loops, callbacks, hyper-parameters). Needs the ``lightning`` extra."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tensorparity.errors import MissingDependencyError
from tensorparity.examples.reference import reference_model

__all__ = ["train_lightning"]


def train_lightning(path: Path, *, steps: int = 2, lr: float = 1e-3) -> Path:
    """Train the reference model for ``steps`` steps with a real ``lightning.Trainer`` and save
    a ``.ckpt`` to ``path``.

    Example:
        >>> import tempfile
        >>> train_lightning(Path(tempfile.mkdtemp()) / "run.ckpt").suffix  # doctest: +SKIP
        '.ckpt'
    """
    try:
        import lightning as L
    except ImportError as exc:
        raise MissingDependencyError("lightning is not installed",
                                     fix="pip install 'tensorparity[lightning]'") from exc

    class Module(L.LightningModule):
        def __init__(self, lr: float = 1e-3, n_classes: int = 10) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = reference_model()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            features, labels = batch
            logits = self.model(features)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

        def configure_optimizers(self) -> dict[str, object]:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
            return {"optimizer": opt, "lr_scheduler": sched}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 16, 20), torch.randint(0, 10, (8, 10)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(path.parent))
        trainer.fit(Module(lr=lr), loader)
        trainer.save_checkpoint(str(path))
    return path
