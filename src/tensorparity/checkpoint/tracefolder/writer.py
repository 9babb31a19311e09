"""Stream a capture's tensors into trace shards (the format: :mod:`.format`).

Where the bytes go, and why. A capture stores every tensor a step produced; the costs that used
to dominate were not the disk but the memory: a clone of each tensor into freshly allocated
memory (the kernel faults in and zeroes every page: ~0.9 ms per MB here, more than the write),
and the page cache's allocation behind each buffered write (~2.5 GB/s on ext4, all of it CPU
time taken from the step on a busy machine). So:

- ``put`` copies the tensor at once, from the calling thread, into fixed-size *blocks* (page
  aligned, mapped once and reused by every later capture of the process): the producer may
  change the tensor as soon as ``put`` returns, and no memory is faulted in after the first
  capture. The blocks are the file's data region laid end to end; a tensor may straddle several
  (it then gets them all at once, and one call measures it and copies each row to its block).
- One I/O thread writes each block as soon as it is full, in file order, with ``O_DIRECT``
  where the file system takes it (the disk's DMA reads the block: no page cache, next to no
  CPU), buffered where it does not (tmpfs, some network file systems). A shard's header, which
  names every tensor in it and so is known last, goes into room reserved at the file's start
  (padded with spaces, which safetensors allows) once the shard is closed.
- Memory is bounded: at most ``queue_bytes`` of blocks are held; a producer waits for the disk
  when they are all full. CUDA tensors are copied on their device (asynchronously, as the step
  goes on) and moved into blocks by a second thread once the copy has finished.

Every tensor starts on a multiple of 64 bytes, as torch's allocator places it: a replay fed
the stored tensors then runs the same BLAS code path as the run that recorded them (a Linear
given an input 36 bytes past a cache line sums in another order, one ulp away). safetensors
allows no gap between tensors, so the few bytes before one are a uint8 tensor of their own,
``__pad__/<n>``, that no record names.

The shard's checksum is xxh3-128 of its bytes in the order they were written: the data region,
then the header (:data:`DATA_FIRST`; :func:`~.format.file_digest` reads it back in that order).
A shard that is read back is an ordinary safetensors file: tensors in arrival order, no gaps.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

import torch
import xxhash

from tensorparity._atomic import fsync_dir, fsync_tree
from tensorparity._output import write_failure
from tensorparity.checkpoint.safetensors import DTYPES
from tensorparity.checkpoint.tracefolder.format import CAPTURING, DATA_FIRST, STORABLE, ShardInfo, TraceError
from tensorparity.checkpoint.tracefolder.records import SCHEMA, TensorStats
from tensorparity.checkpoint.tracefolder.stats import tensor_stats
from tensorparity.errors import CorruptCheckpointError

__all__ = ["TraceWriter"]

ALIGN = 4096  # O_DIRECT's alignment of buffers, offsets and lengths (a page: every device's block size divides it)
BLOCK = 4 << 20  # bytes per block (a smaller queue gets smaller blocks, ALIGN at least)
PAD = 64  # every tensor starts at a multiple of this in its shard, as torch allocates it (see _reserve)
PAD_KEY = "__pad__/"  # the padding before a tensor is a uint8 tensor of its own: safetensors allows no gaps
HEADER_ROOM = 64 << 10  # header room of a first shard when no estimate is given (~400 tensors' entries)
KEEP = 64 << 20  # free blocks kept mapped for the process's next capture
_CODE = {getattr(torch, name): code for code, name in DTYPES.items()}
_METADATA = json.dumps({"format": "pt", "tensorparity": SCHEMA}, separators=(",", ":"))


class _Block:
    """``size`` bytes of page-aligned anonymous memory and a uint8 tensor over them."""

    __slots__ = ("mm", "size", "tensor")

    def __init__(self, size: int) -> None:
        if hasattr(mmap, "MAP_PRIVATE"):  # faulted in once, here (MAP_POPULATE where there is one)
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_POPULATE", 0)
            self.mm = mmap.mmap(-1, size, flags=flags)
        else:  # Windows: anonymous memory has no flags
            self.mm = mmap.mmap(-1, size)
        self.size = size
        self.tensor = torch.frombuffer(self.mm, dtype=torch.uint8)

    def release(self) -> None:
        del self.tensor
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


class _Pool:
    """Free blocks by size, shared by every writer of the process (a capture per step reuses them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free: dict[int, list[_Block]] = {}
        self.kept = 0

    def get(self, size: int) -> _Block:
        with self.lock:
            found = self.free.get(size)
            if found:
                self.kept -= size
                return found.pop()
        return _Block(size)

    def put(self, block: _Block) -> None:
        with self.lock:
            if self.kept + block.size <= KEEP:
                self.free.setdefault(block.size, []).append(block)
                self.kept += block.size
                return
        block.release()


_POOL = _Pool()


@dataclass(eq=False)
class _Shard:
    index: int
    path: Path
    fd: int
    direct: bool
    room: int  # where the data starts: header room, ALIGN-aligned
    header: int  # bytes of header JSON so far (metadata, braces, entries and commas)
    end: int = 0  # data bytes reserved so far
    entries: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    blocks: dict[int, _Block] = field(default_factory=dict)
    filled: dict[int, int] = field(default_factory=dict)  # per block: bytes copied in so far
    acquired: int = 0  # blocks 0..acquired-1 have been handed out
    written: int = 0  # blocks 0..written-1 are on disk
    closing: bool = False
    hasher: Any = field(default_factory=xxhash.xxh3_128)

    @property
    def name(self) -> str:
        return self.path.name


class TraceWriter:
    """Stream tensors into safetensors shards: copied into reused blocks by ``put``, written
    block by block (``O_DIRECT`` where the file system allows) by a background thread.

    ``put`` copies the tensor before it returns (the caller may change it afterwards) and calls
    ``done(tensor)`` on it (capture computes statistics there); it waits while ``queue_bytes`` of
    blocks wait for the disk. A shard is closed when the next tensor would take it past
    ``shard_bytes`` (a larger tensor gets a shard of its own). Memory held is at most
    ``queue_bytes`` (one block where that is less), plus CUDA tensors' device copies.

    Example:
        >>> import tempfile
        >>> w = TraceWriter(Path(tempfile.mkdtemp()) / "t")
        >>> w.put("m/0/output", torch.ones(2))
        >>> w.same_as("m/0/grad_output", "m/0/output")  # the same tensor, recorded again: stored once
        >>> [s.file for s in w.close()], w.shard_of["m/0/grad_output"]
        (['shard-00000.safetensors'], 'shard-00000.safetensors')
    """

    def __init__(self, folder: Path, *, shard_bytes: int = 256 << 20, queue_bytes: int = 512 << 20,
                 fsync: bool = False, direct: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Marks the folder as a trace being written until the manifest replaces the mark: a
        # capture that dies before its first shard is still recognised as unfinished.
        (self.folder / CAPTURING).touch()
        self.shard_bytes, self.queue_bytes, self.fsync = max(1, shard_bytes), max(1, queue_bytes), fsync
        self.direct = direct  # O_DIRECT where the file system takes it; False: through the page cache
        # The first shard's header room: set it (bytes) to what the header will take where that can
        # be estimated (capture does); a shard whose room runs out is closed, the next gets twice.
        self.header_room = HEADER_ROOM
        self.block = max(ALIGN, min(BLOCK, 1 << (max(1, self.queue_bytes // 2).bit_length() - 1)))
        self.max_blocks = max(1, self.queue_bytes // self.block)
        self.shards: list[ShardInfo] = []
        self.shard_of: dict[str, str] = {}
        self.aliases: dict[str, str] = {}  # key -> the key whose stored tensor it is (see same_as)
        self.peak_bytes = 0  # most bytes ever held in blocks (the bound holds: tests check it)
        self._held = 0  # blocks held
        self._open: deque[_Shard] = deque()  # shards not yet finished, oldest first
        self._current: _Shard | None = None
        self._count = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = self._closing = False
        self._device: deque[tuple[str, torch.Tensor, Any, Callable[[TensorStats], None] | None] | None] = deque()
        self._device_bytes = 0
        self._device_thread: threading.Thread | None = None
        self._thread = threading.Thread(target=self._run, name="tensorparity-trace-writer", daemon=True)
        self._thread.start()

    # The producer's side
    def put(self, key: str, tensor: torch.Tensor, done: Callable[[TensorStats], None] | None = None) -> None:
        """Store ``tensor`` under ``key`` (copied now); waits while the blocks are all full.
        ``done(stats)``, where given, gets the tensor's statistics, measured as it is copied."""
        if tensor.dtype not in STORABLE:
            raise TraceError(f"dtype {tensor.dtype} cannot be stored in safetensors", key=key,
                             fix="record it in stats mode")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            self._put_device(key, tensor, done)
            return
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        stats = self._store(key, tensor, done is not None)
        if done is not None:
            done(stats)  # type: ignore[arg-type]

    def same_as(self, key: str, stored: str) -> None:
        """Record ``key`` as the tensor already stored under ``stored`` (put before, unchanged
        since): nothing is copied or written; the manifest says so (``same_as``) and readers load
        ``stored``'s bytes for it."""
        with self._cond:
            self._raise_error()
            if stored in self.aliases or stored == key:
                raise TraceError(f"same_as({key!r}, {stored!r}): the target must be a tensor stored under its own key",
                                 key=key, fix="please report it; capture with mode='stats' meanwhile")
            self.aliases[key] = stored

    def _put_device(self, key: str, tensor: torch.Tensor, done: Callable[[TensorStats], None] | None) -> None:
        # Copied on its device now (the step goes on); the device thread waits for the copy,
        # brings it to the CPU and stores it. Device memory held is bounded like the blocks.
        copy = tensor.clone(memory_format=torch.contiguous_format)
        event = None
        if copy.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(copy.device))
        nbytes = copy.numel() * copy.element_size()
        with self._cond:
            while self._device_bytes and self._device_bytes + nbytes > self.queue_bytes and self._error is None:
                self._cond.wait()
            self._raise_error()
            self._device.append((key, copy, event, done))
            self._device_bytes += nbytes
            if self._device_thread is None:
                self._device_thread = threading.Thread(target=self._run_device, name="tensorparity-trace-device",
                                                       daemon=True)
                self._device_thread.start()
            self._cond.notify_all()

    def _run_device(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._device and not self._stop:
                        self._cond.wait()
                    if self._stop or self._device[0] is None:  # stopped, or closed: all stored
                        return
                    key, copy, event, done = self._device.popleft()  # type: ignore[misc]
                if event is not None:
                    event.synchronize()
                cpu = copy.to("cpu")
                nbytes = copy.numel() * copy.element_size()
                del copy
                with self._cond:
                    self._device_bytes -= nbytes
                    self._cond.notify_all()
                stats = self._store(key, cpu, done is not None)
                if done is not None:
                    done(stats)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - handed to the producer, raised there
            self._fail(exc)

    def _store(self, key: str, tensor: torch.Tensor, measure: bool) -> TensorStats | None:
        """Reserve the tensor's bytes in the current shard, then copy them into its blocks (and
        measure it, where asked: in the same read, unless it spans more blocks than may be held)."""
        nbytes = tensor.numel() * tensor.element_size()
        with self._cond:
            self._raise_error()
            shard, start, pad = self._reserve(key, tensor, nbytes)
        size = self.block
        if pad:  # zeros up to the tensor's aligned start (never across a block's end: blocks are aligned)
            k, off = divmod(start, size)
            self._acquire(shard, k).tensor[off:off + pad].zero_()
            self._filled(shard, k, pad)
            start += pad
        k, off = divmod(start, size)
        if nbytes and off + nbytes <= size:
            dst = self._acquire(shard, k).tensor[off:off + nbytes]
            if not measure:
                dst.copy_(tensor.reshape(-1).view(torch.uint8))
            stats = tensor_stats(tensor, into=dst.numpy()) if measure else None
            self._filled(shard, k, nbytes)
            return stats
        last = (start + nbytes - 1) // size
        if measure and last - k < self.max_blocks:
            # Straddling blocks: all of them at once (blocks are handed out in file order, and this
            # tensor's are no more than may be held), measured and copied in one read.
            parts = [(j, max(start, j * size) - j * size, min(start + nbytes, (j + 1) * size) - j * size)
                     for j in range(k, last + 1)]
            views = [self._acquire(shard, j).tensor[lo:hi].numpy() for j, lo, hi in parts]
            stats = tensor_stats(tensor, into=views)
            for j, lo, hi in parts:
                self._filled(shard, j, hi - lo)
            return stats
        stats = tensor_stats(tensor) if measure else None
        raw = tensor.reshape(-1).view(torch.uint8) if nbytes else None
        pos, stop = start, start + nbytes
        while pos < stop:
            k, off = divmod(pos, size)
            take = min(size - off, stop - pos)
            self._acquire(shard, k).tensor[off:off + take].copy_(raw[pos - start:pos - start + take])  # type: ignore[index]
            self._filled(shard, k, take)
            pos += take
        return stats

    def _filled(self, shard: _Shard, k: int, nbytes: int) -> None:
        with self._cond:
            shard.filled[k] += nbytes
            if self._complete(shard, k):
                self._cond.notify_all()

    def _reserve(self, key: str, tensor: torch.Tensor, nbytes: int) -> tuple[_Shard, int, int]:
        """Room for the tensor's bytes in the current shard (a new one where it is full): its
        shard, where its padding starts and how long that is (see :data:`PAD`)."""
        shard = self._current
        if shard is not None and shard.end and shard.end + nbytes > self.shard_bytes:
            self._close_current()
            shard = None
        # This tensor's header entry, the offsets filled in once its shard is known.
        head = encode_basestring(key) + ':{"dtype":"' + _CODE[tensor.dtype] + '","shape":[' + ",".join(
            map(str, tensor.shape)) + '],"data_offsets":['
        extra = len(head.encode()) - len(head)  # a key's non-ASCII characters take more than a byte
        for _ in range(2):
            end = shard.end if shard is not None else 0
            pad = -end % PAD if nbytes else 0
            entries = []
            if pad and shard is not None:
                entries.append(f'"{PAD_KEY}{len(shard.keys)}":{{"dtype":"U8","shape":[{pad}],'
                               f'"data_offsets":[{end},{end + pad}]}}')
            entries.append(f"{head}{end + pad},{end + pad + nbytes}]}}")
            length = sum(len(e) + 1 for e in entries) + extra
            if shard is not None and shard.header + length <= shard.room - 8:
                break
            if shard is not None:  # its header room is full: the next shard gets twice as much
                room = shard.room * 2
                self._close_current()
            else:
                room = self.header_room
            shard = self._open_shard(room, length)
        assert shard is not None
        shard.header += length
        shard.entries.extend(entries)
        shard.keys.append(key)
        start, shard.end = shard.end, shard.end + pad + nbytes
        return shard, start, pad

    def _open_shard(self, room: int, entry: int) -> _Shard:
        header = len(_METADATA) + len('{"__metadata__":}')
        room = -(-max(room, 8 + header + 1 + entry) // ALIGN) * ALIGN
        path = self.folder / f"shard-{self._count:05d}.safetensors"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0) if self.direct else 0
        try:
            fd = os.open(path, flags | direct) if direct else os.open(path, flags)
        except OSError:  # this file system takes no O_DIRECT (tmpfs): buffered writes
            if not direct or path.exists():
                raise
            fd, direct = os.open(path, flags), 0
        shard = _Shard(self._count, path, fd, bool(direct), room, header)
        self._count += 1
        self._open.append(shard)
        self._current = shard
        return shard

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.closing = True
            self._current = None
            self._cond.notify_all()

    def _acquire(self, shard: _Shard, k: int) -> _Block:
        """Block ``k`` of ``shard``: blocks are handed out in file order (every earlier shard's
        first), each once, and only while fewer than ``max_blocks`` are held."""
        with self._cond:
            while k >= shard.acquired:
                self._raise_error()
                if self._stop:
                    raise TraceError("the capture was aborted while this tensor was being stored", path=self.folder,
                                     fix="see the error that aborted it")
                target = next((s for s in self._open if self._unacquired(s)), None)
                if target is None or self._held >= self.max_blocks:
                    self._cond.wait()
                    continue
                target.blocks[target.acquired] = _POOL.get(self.block)
                target.filled[target.acquired] = 0
                target.acquired += 1
                self._held += 1
                self.peak_bytes = max(self.peak_bytes, self._held * self.block)
            return shard.blocks[k]

    def _unacquired(self, shard: _Shard) -> bool:
        return shard.acquired * self.block < shard.end

    def _complete(self, shard: _Shard, k: int) -> bool:
        if k >= shard.acquired:
            return False
        filled = shard.filled[k]
        return filled == self.block or (shard.closing and filled == min(self.block, shard.end - k * self.block))

    # The I/O thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        if self._stop:
                            return
                        shard = self._open[0] if self._open else None
                        if shard is not None and self._complete(shard, shard.written):
                            job = shard.written
                            break
                        if shard is not None and shard.closing and shard.written * self.block >= shard.end:
                            job = -1
                            break
                        if shard is None and self._closing:
                            return
                        self._cond.wait()
                if job >= 0:
                    self._write_block(shard, job)
                else:
                    self._finish(shard)
        except BaseException as exc:  # noqa: BLE001 - handed to the producer, raised there
            self._fail(exc)

    def _write_block(self, shard: _Shard, k: int) -> None:
        block = shard.blocks[k]
        length = min(self.block, shard.end - k * self.block)
        with memoryview(block.mm) as view:
            shard.hasher.update(view[:length])
            padded = -(-length // ALIGN) * ALIGN
            if padded != length:
                block.tensor[length:padded].zero_()
            self._pwrite(shard, view[:padded], shard.room + k * self.block)
        with self._cond:
            del shard.blocks[k], shard.filled[k]
            shard.written += 1
            self._held -= 1
            self._cond.notify_all()
        _POOL.put(block)

    def _pwrite(self, shard: _Shard, data: memoryview, offset: int) -> None:
        while len(data):
            try:
                n = os.pwrite(shard.fd, data, offset)
            except OSError as exc:
                if not shard.direct or exc.errno != errno.EINVAL:
                    raise
                # O_DIRECT refused at the first write (some file systems accept the flag only):
                # the rest of this shard is written through the page cache.
                os.close(shard.fd)
                shard.fd, shard.direct = os.open(shard.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)), False
                continue
            data, offset = data[n:], offset + n

    def _finish(self, shard: _Shard) -> None:
        """Every block is on disk: cut the last block's padding, write the header, checksum."""
        size = shard.room + shard.end
        os.ftruncate(shard.fd, size)
        text = ('{"__metadata__":' + _METADATA + "".join("," + e for e in shard.entries) + "}").encode()
        if len(text) > shard.room - 8:  # never: _reserve keeps every entry inside the room
            raise TraceError(f"{shard.name}: the header outgrew its room ({len(text)} > {shard.room - 8} bytes)",
                             path=self.folder, fix="please report it; capture with shard_bytes smaller meanwhile")
        head = (shard.room - 8).to_bytes(8, "little") + text + b" " * (shard.room - 8 - len(text))
        if shard.direct:  # the header's room is aligned: written from a block of its own
            block = _POOL.get(shard.room)
            try:
                block.mm[:len(head)] = head
                with memoryview(block.mm) as view:
                    self._pwrite(shard, view[:shard.room], 0)
            finally:
                _POOL.put(block)
        else:
            self._pwrite(shard, memoryview(head), 0)
        os.close(shard.fd)
        shard.fd = -1
        shard.hasher.update(head)
        if self.fsync:
            fsync_tree(shard.path)
        with self._cond:
            self.shards.append(ShardInfo(shard.name, size, shard.hasher.hexdigest(), len(shard.keys), DATA_FIRST))
            for key in shard.keys:
                self.shard_of[key] = shard.name
            self._open.popleft()
            self._cond.notify_all()

    # Ending
    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._stop = True
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            exc = self._error
            if isinstance(exc, CorruptCheckpointError):
                raise exc
            if isinstance(exc, OSError):
                raise write_failure(exc, "the trace", self.folder, error=TraceError,
                                    left="capture again; the folder holds no complete trace") from exc
            raise TraceError(f"writing the trace failed ({type(exc).__name__}: {exc})", path=self.folder,
                             fix="this tensor could not be stored: please report it (with the model's "
                                 "type) and capture with mode='stats' meanwhile") from exc

    def close(self) -> list[ShardInfo]:
        """Write what is left, wait for the threads, return the shards (raises the writer's error)."""
        if self._device_thread is not None:
            with self._cond:
                self._device.append(None)
                self._cond.notify_all()
            self._device_thread.join()
        with self._cond:
            self._close_current()
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._release()
        self._raise_error()
        for key, stored in self.aliases.items():
            if stored not in self.shard_of:
                raise TraceError(f"{key} is recorded as the same tensor as {stored}, which was never stored",
                                 path=self.folder, key=key, fix="please report it; capture with mode='stats' meanwhile")
            self.shard_of[key] = self.shard_of[stored]
        if self.fsync and self.shards:
            fsync_dir(self.folder)
        return list(self.shards)

    def abort(self) -> None:
        """Stop without writing what is left (a failed capture); the folder gets no manifest."""
        with self._cond:
            self._stop = True
            self._device.clear()
            self._device_bytes = 0
            self._cond.notify_all()
        for thread in (self._device_thread, self._thread):
            if thread is not None:
                thread.join()
        self._release()

    def _release(self) -> None:
        with self._cond:
            shards, self._open, self._current = list(self._open), deque(), None
        for shard in shards:
            for block in shard.blocks.values():
                _POOL.put(block)
            shard.blocks.clear()
            if shard.fd >= 0:
                os.close(shard.fd)
                shard.fd = -1
