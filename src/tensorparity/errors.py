"""The one exception tree of tensorparity.

Every error a user can cause is a :class:`TensorParityError`; its message is one line that says
what failed, where (file, key or archive member) and how to fix it. Bugs in tensorparity itself are
:class:`InternalError`, deliberately *not* a subclass, so that ``except TensorParityError`` never
hides them::

    TensorParityError                 anything the user's input or environment caused
    ├── SourceError                   a checkpoint could not be opened or read
    │   ├── SourceNotFoundError       the path does not exist
    │   ├── UnknownFormatError        no reader recognises the file or folder
    │   ├── CorruptCheckpointError    truncated, malformed or self-contradictory bytes
    │   │   └── TraceError            a trace folder is unfinished, corrupt or of another schema (checkpoint.tracefolder)
    │   └── UnsafeCheckpointError     refused for safety: path traversal, links, bombs, TorchScript
    ├── MissingDependencyError        an optional extra is not installed
    ├── NondeterminismError           two uninterrupted training runs differ (resume._recipe_errors)
    └── UsageError                    an argument or option is wrong
        ├── MappingError              a mapping file or rule is wrong (mapping.rules)
        ├── FactoryError              a model factory cannot be resolved or built (_factory)
        ├── RecipeError               a training recipe fails to build, step, save or load (resume._recipe_errors)
        └── MigrationError            a migration is wrong (migrate.registry)
            ├── ConflictError         two migrations write one key
            └── DowngradeError        the checkpoint is newer than the code and no inverse is defined
    InternalError                     a bug in tensorparity (please report it)

The subclasses live beside the code that raises them; this tree is their one map.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CorruptCheckpointError",
    "InternalError",
    "MissingDependencyError",
    "SourceError",
    "SourceNotFoundError",
    "TensorParityError",
    "UnknownFormatError",
    "UnsafeCheckpointError",
    "UsageError",
]


class TensorParityError(Exception):
    """Base of every error caused by input or environment.

    Args:
        message: what failed, in a few words.
        path: the file or folder concerned.
        key: the checkpoint key, archive member or field concerned.
        fix: what the user can do about it.

    Example:
        >>> str(TensorParityError("bad header", path="a.safetensors", fix="re-save the file"))
        'a.safetensors: bad header; fix: re-save the file'
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        key: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.key = key
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.path:
            where = self.path
        if self.key:
            where = f"{where} [{self.key}]" if where else f"[{self.key}]"
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text = f"{text}; fix: {self.fix}"
        # One line, always: multi-line causes are folded.
        return " ".join(text.split())

    def with_path(self, path: str | Path) -> TensorParityError:
        """Return the same error, naming ``path`` when it did not name a file yet."""
        if self.path is None:
            self.path = str(path)
            self.args = (self._render(),)
        return self


class SourceError(TensorParityError):
    """A checkpoint could not be opened or read."""


class SourceNotFoundError(SourceError):
    """The path does not exist."""


class UnknownFormatError(SourceError):
    """No reader recognises the file or folder."""


class CorruptCheckpointError(SourceError):
    """The bytes are truncated, malformed or contradict each other."""


class UnsafeCheckpointError(SourceError):
    """The input was refused for safety (path traversal, links, bombs, TorchScript code)."""


class MissingDependencyError(TensorParityError):
    """An optional dependency (an extra) is not installed."""


class UsageError(TensorParityError):
    """An argument or option is wrong."""


class InternalError(Exception):
    """A bug in tensorparity; not a TensorParityError on purpose. Please report it."""
