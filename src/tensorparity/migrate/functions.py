"""Small pure functions over the checkpoint tree that releases keep needing, ready to use in a
migration (Python: ``function=tie_weights({...})``; YAML: ``steps: [{tie: {...}}]``).

Each factory checks its arguments now and returns ``function(tree)``, which edits a
:class:`~tensorparity.migrate.nested.Tree` and raises :class:`MigrationError` (naming the key and
the fix) when the checkpoint does not hold what it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tensorparity.migrate.nested import Tree
from tensorparity.migrate.registry import MigrationError

__all__ = ["STEPS", "delete_keys", "move_keys", "recompute_last_epoch", "set_values", "tie_weights"]

TreeFunction = Callable[[Tree], None]


def _pairs(value: Any, what: str, example: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in value.items()):
        raise MigrationError(f"{what} takes a mapping of key to key, got {value!r}", fix=f"write e.g. {example}")
    return dict(value)


def tie_weights(aliases: Mapping[str, str]) -> TreeFunction:
    """Add missing tied weights from an alias table ``{missing key: key holding the data}``.

    A key that is already there is left alone (a checkpoint that stored the tie twice is fine).

    Example:
        >>> import torch, tensorparity
        >>> tree = Tree(dict(tensorparity.open({"embed.weight": torch.ones(4, 2)})))
        >>> tie_weights({"head.weight": "embed.weight"})(tree); tree.keys()
        ['embed.weight', 'head.weight']
    """
    table = _pairs(aliases, "tie", "{tie: {lm_head.weight: embed.weight}}")

    def tie(tree: Tree) -> None:
        for key, source in table.items():
            if key not in tree:
                tree.copy(source, key)

    return tie


def move_keys(moves: Mapping[str, str]) -> TreeFunction:
    """Move keys, or every key under a prefix, to another name or section: ``{old: new}``.

    Example:
        >>> import torch, tensorparity
        >>> tree = Tree(dict(tensorparity.open({"state_dict": {"ema.w": torch.ones(1), "w": torch.ones(1)}})))
        >>> move_keys({"state_dict.ema": "ema_state"})(tree); tree.keys()
        ['ema_state.w', 'state_dict.w']
    """
    table = _pairs(moves, "move", "{move: {state_dict.ema: ema_state}}")

    def move(tree: Tree) -> None:
        for old, new in table.items():
            if old in tree:
                tree.move(old, new)
            elif not tree.move_prefix(old, new):
                raise MigrationError(f"move: nothing is at or under {old!r}", key=old,
                                     fix="check the key or prefix (tensorparity inspect lists the keys)")

    return move


def recompute_last_epoch(*, scheduler: str = "lr_schedulers.0", step: str = "global_step",
                         steps_per_epoch: int = 1) -> TreeFunction:
    """Recompute a scheduler's ``last_epoch`` (and ``_step_count``) from the global step.

    A scheduler stepped every optimizer step has ``last_epoch == global_step``; one stepped per
    epoch has ``global_step // steps_per_epoch``. Releases that saved it wrong (or not at all)
    resume with the wrong learning rate.

    Example:
        >>> import tensorparity
        >>> tree = Tree(dict(tensorparity.open({"global_step": 30, "lr_schedulers": [{"last_epoch": 0,
        ...                                     "_step_count": 1}]})))
        >>> recompute_last_epoch(steps_per_epoch=10)(tree); tree.value("lr_schedulers.0.last_epoch")
        3
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise MigrationError(f"last_epoch: steps_per_epoch must be a positive integer, not {steps_per_epoch!r}",
                             fix="write e.g. {last_epoch: {steps_per_epoch: 100}}")

    def last_epoch(tree: Tree) -> None:
        global_step = tree.value(step)
        if isinstance(global_step, bool) or not isinstance(global_step, int):
            raise MigrationError(f"last_epoch: {step!r} holds {global_step!r}, not a step count", key=step,
                                 fix="name the key that holds the global step (step: ...)")
        if not tree.under(scheduler):
            raise MigrationError(f"last_epoch: the checkpoint has no scheduler state at {scheduler!r}", key=scheduler,
                                 fix="name the scheduler's key prefix (scheduler: lr_schedulers.0)")
        epoch = global_step // steps_per_epoch
        tree.set(f"{scheduler}.last_epoch", epoch)
        if f"{scheduler}._step_count" in tree:
            tree.set(f"{scheduler}._step_count", epoch + 1)  # torch counts the constructor's step too

    return last_epoch


def set_values(values: Mapping[str, Any]) -> TreeFunction:
    """Set keys to plain values (a dict or list value becomes the keys under its key).

    Example:
        >>> tree = Tree({}); set_values({"meta.release": "2.0"})(tree); tree.value("meta.release")
        '2.0'
    """
    if not isinstance(values, Mapping) or not values or not all(isinstance(k, str) for k in values):
        raise MigrationError(f"set takes a mapping of key to value, got {values!r}", fix="write {set: {epoch: 0}}")
    table = dict(values)

    def set_(tree: Tree) -> None:
        for key, value in table.items():
            tree.set(key, value)

    return set_


def delete_keys(patterns: Sequence[str] | str) -> TreeFunction:
    """Remove keys (glob patterns allowed); a pattern that matches nothing is fine.

    Example:
        >>> import torch, tensorparity
        >>> tree = Tree(dict(tensorparity.open({"a.tmp": 1, "b": 2})))
        >>> delete_keys(["*.tmp"])(tree); tree.keys()
        ['b']
    """
    items = [patterns] if isinstance(patterns, str) else list(patterns) if isinstance(patterns, Sequence) else None
    if not items or not all(isinstance(p, str) for p in items):
        raise MigrationError(f"delete takes a list of keys or glob patterns, got {patterns!r}",
                             fix="write {delete: ['*.num_batches_tracked']}")

    def delete(tree: Tree) -> None:
        for pattern in items:
            tree.delete(pattern)

    return delete


def _last_epoch(value: Any) -> TreeFunction:
    if value is None:
        return recompute_last_epoch()
    if not isinstance(value, Mapping) or set(value) - {"scheduler", "step", "steps_per_epoch"}:
        raise MigrationError(f"last_epoch takes scheduler, step and steps_per_epoch, got {value!r}",
                             fix="write {last_epoch: {scheduler: lr_schedulers.0, steps_per_epoch: 100}}")
    return recompute_last_epoch(**value)


# The step names a YAML spec may use, and how each turns its value into a tree function.
STEPS: dict[str, Callable[[Any], TreeFunction]] = {
    "tie": tie_weights, "move": move_keys, "set": set_values, "delete": delete_keys, "last_epoch": _last_epoch,
}
