"""Replace a file or folder so that a crash leaves the old one or the new one, never a torn mix.

The implementation is :mod:`tensorparity._output` (:func:`~tensorparity._output.atomic_output`,
the one home of atomic writes and of the overwrite policy); this module keeps the names that
migrate has always exported under this path.
"""

from __future__ import annotations

from tensorparity._output import atomic_output, clean_stale, fsync_tree, temp_name

__all__ = ["atomic_output", "clean_stale", "fsync_tree", "temp_name"]
