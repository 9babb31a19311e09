"""Parameters, buffers, or just tensor elements: what a checkpoint's counts can honestly say.

A state dict holds a module's parameters *and* its persistent buffers (BatchNorm running
statistics, a featurizer's window and filterbank) as plain tensors, so summing every tensor counts
*elements*, not parameters. The split is exact when the module itself is at hand
(:func:`module_counts`: torch's own ``parameters()`` and ``buffers()``); from a file it is known
only where the file says so: tensors saved as ``nn.Parameter``, buffer names torch and common
libraries always use (``running_mean``, ``inv_freq``, ...), and a ``.nemo`` whose config names a
class with known buffers (:func:`buffer_keys`). Where nothing tells them apart, callers say
"elements".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensorparity.checkpoint.tree import Checkpoint, TensorEntry, ValueEntry

if TYPE_CHECKING:
    import torch

__all__ = ["BUFFER_NAMES", "CLASS_BUFFERS", "Counts", "buffer_keys", "entry_counts", "module_counts"]

# Last key components that are buffers wherever they appear: torch's norm layers (BatchNorm,
# InstanceNorm with track_running_stats), torch.nn.utils.prune masks, rotary-embedding caches,
# Hugging Face embedding ids, Swin/BEiT relative position indices, fairseq's dtype sentinel.
BUFFER_NAMES = frozenset({
    "running_mean", "running_var", "num_batches_tracked",
    "weight_mask", "bias_mask",
    "inv_freq", "cos_cached", "sin_cached",
    "position_ids", "token_type_ids",
    "relative_position_index",
    "_float_tensor",
})

# Classes a NeMo config names (``_target_``) -> buffer keys under the module it configures.
# FilterbankFeatures registers ``window`` and ``fb``; the torchaudio featurizers register
# Spectrogram.window, MelScale.fb and MFCC.dct_mat.
CLASS_BUFFERS: dict[str, tuple[str, ...]] = {
    "AudioToMelSpectrogramPreprocessor": (
        "featurizer.window", "featurizer.fb",
        "featurizer._mel_spec_extractor.spectrogram.window", "featurizer._mel_spec_extractor.mel_scale.fb"),
    "AudioToMFCCPreprocessor": (
        "featurizer.MelSpectrogram.spectrogram.window", "featurizer.MelSpectrogram.mel_scale.fb",
        "featurizer.dct_mat"),
}


@dataclass(frozen=True)
class Counts:
    """Tensor elements, and the parameter / buffer split where it is known.

    Attributes:
        elements: elements of every tensor counted (what a file can always tell).
        parameters: parameter elements, ``None`` where parameters and buffers cannot be told apart.
        buffers: buffer elements, ``None`` likewise.
        trainable: parameter elements with ``requires_grad``, where known.
        basis: how the split is known: ``"module"`` (torch counted them), ``"saved parameters"``
            (the file saved ``nn.Parameter``\\ s) or ``"names"`` (buffer names and classes the file
            names); ``None`` when it is not.

    Example:
        >>> Counts(12, 10, 2, 10, "module").describe()
        '10 parameters, 10 trainable, 2 buffer elements'
        >>> Counts(12).describe()
        '12 elements'
    """

    elements: int
    parameters: int | None = None
    buffers: int | None = None
    trainable: int | None = None
    basis: str | None = None

    @property
    def known(self) -> bool:
        """Whether parameters and buffers are told apart."""
        return self.parameters is not None and self.buffers is not None

    def describe(self) -> str:
        """The counts in words: parameters and buffers where known, else elements."""
        if not self.known:
            text = f"{self.elements:,} {'element' if self.elements == 1 else 'elements'}"
            return text + (f", {self.trainable:,} trainable parameters" if self.trainable is not None else "")
        assert self.parameters is not None and self.buffers is not None
        text = f"{self.parameters:,} {'parameter' if self.parameters == 1 else 'parameters'}"
        text += f", {self.trainable:,} trainable" if self.trainable is not None else ""
        return text + f", {self.buffers:,} buffer {'element' if self.buffers == 1 else 'elements'}"

    def to_dict(self) -> dict[str, Any]:
        return {"elements": self.elements, "parameters": self.parameters, "buffers": self.buffers,
                "trainable": self.trainable, "counted_by": self.basis}


def module_counts(module: torch.nn.Module) -> Counts:
    """Torch's own counts of a live module: ``parameters()``, ``buffers()`` (shared tensors once,
    non-persistent buffers included); ``elements`` counts its ``state_dict()``.

    Example:
        >>> import torch
        >>> module_counts(torch.nn.BatchNorm1d(4)).describe()
        '8 parameters, 8 trainable, 9 buffer elements'
    """
    import torch

    params = list(module.parameters())
    return Counts(elements=sum(t.numel() for t in module.state_dict().values() if isinstance(t, torch.Tensor)),
                  parameters=sum(p.numel() for p in params),
                  buffers=sum(b.numel() for b in module.buffers()),
                  trainable=sum(p.numel() for p in params if p.requires_grad), basis="module")


def buffer_keys(ckpt: Checkpoint) -> dict[str, str]:
    """The checkpoint's tensor keys that are buffers by name, each with the reason.

    Example:
        >>> import torch, tensorparity
        >>> buffer_keys(tensorparity.open(torch.nn.BatchNorm1d(2).state_dict()))["running_var"]
        'BatchNorm running statistics'
    """
    out: dict[str, str] = {}
    tensor_keys = [e.key for e in ckpt.tensors()]
    for key in tensor_keys:
        name = key.rpartition(".")[2]
        if name in BUFFER_NAMES:
            out[key] = ("BatchNorm running statistics" if name in ("running_mean", "running_var", "num_batches_tracked")
                        else f"{name} buffers")
    present = set(tensor_keys)
    for key in ckpt:
        entry = ckpt[key]
        if not (key.startswith("model_config.") and key.endswith(("._target_", ".target"))):
            continue
        if not isinstance(entry, ValueEntry) or not isinstance(entry.value, str):
            continue
        cls = entry.value.rpartition(".")[2]
        path = key.removeprefix("model_config.").rpartition(".")[0]
        for prefix in (path, path.removeprefix("model.")):  # a full experiment config nests under "model"
            for suffix in CLASS_BUFFERS.get(cls, ()):
                for candidate in (f"{prefix}.{suffix}", *(k for k in present if k.endswith(f".{prefix}.{suffix}"))):
                    if candidate in present:
                        out[candidate] = f"{cls} buffers (from model_config.yaml)"
    return out


def entry_counts(entries: Iterable[TensorEntry], buffers: Iterable[str] = (), *,
                 trainable: int | None = None) -> Counts:
    """Counts of tensor entries: split into parameters and buffers when the entries say which
    (saved as ``nn.Parameter``) or ``buffers`` names some of them; elements only otherwise.

    Args:
        entries: the tensors counted.
        buffers: keys known to be buffers (from :func:`buffer_keys`), possibly of other entries too.
        trainable: trainable parameter elements, when the source recorded them.

    Example:
        >>> import torch, tensorparity
        >>> ckpt = tensorparity.open(torch.nn.BatchNorm1d(2).state_dict())
        >>> entry_counts(ckpt.tensors(), buffer_keys(ckpt)).describe()
        '4 parameters, 5 buffer elements'
    """
    tensors = list(entries)
    named = set(buffers)
    elements = sum(e.numel for e in tensors)
    if any(e.is_parameter for e in tensors):  # the file kept nn.Parameter: everything else is a buffer
        params = [e for e in tensors if e.is_parameter]
        n_params = sum(e.numel for e in params)
        if trainable is None:
            trainable = sum(e.numel for e in params if e.requires_grad)
        return Counts(elements, n_params, elements - n_params, trainable, "saved parameters")
    n_buffers = sum(e.numel for e in tensors if e.key in named)
    if not any(e.key in named for e in tensors):
        return Counts(elements, trainable=trainable)
    return Counts(elements, elements - n_buffers, n_buffers, trainable, "names")
