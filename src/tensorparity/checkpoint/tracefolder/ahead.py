"""Shard checksums checked on a background thread while a comparison plans (see
:func:`check_ahead`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import zip_longest
from typing import Any

__all__ = ["check_ahead"]


@contextmanager
def check_ahead(*sources: Any) -> Iterator[None]:
    """While the block runs, the shard checksums of ``sources`` (traces; others are skipped) are
    checked on one background thread, the two sides' shards in turn, so that a comparison's
    workers find them checked instead of stopping to hash them (the hashers release the GIL:
    this overlaps the Python that plans a comparison, and its first comparisons).

    A shard whose manifest checksum another source's manifest lists too is left alone: the same
    bytes on both sides compare equal without their values being read, so it may never need
    checking (traces of the same run, compared, hash nothing ahead).

    Nothing changes what is checked or when it is known to fail: a shard is marked checked only
    where its checksum matched, a failure here is left for the reader that needs the shard (it
    checks it again and raises), and a worker that needs a shard being hashed waits for it as it
    would for another worker. The thread stops between shards when the block ends.
    """
    lists = [checks() for src in sources if callable(checks := getattr(src, "pending_checks", None))]
    digests = [{digest for digest, _ in checks} for checks in lists]

    def elsewhere(i: int, digest: str) -> bool:
        return any(digest in other for j, other in enumerate(digests) if j != i)

    own = [[job for digest, job in checks if not elsewhere(i, digest)] for i, checks in enumerate(lists)]
    queue = [job for batch in zip_longest(*own) for job in batch if job is not None]
    if not queue:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        for job in queue:
            if stop.is_set():
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - the reader that needs this shard checks it again and raises
                continue

    thread = threading.Thread(target=run, name="tensorparity-check-ahead", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
