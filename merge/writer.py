"""Writing safetensors files tensor by tensor, hashing them (sha256) while they are written.

A safetensors file is `u64 little-endian N` + an `N`-byte JSON header (padded with spaces to a
multiple of 8) + the tensors' bytes, back to back in header order. Since every output shape
and dtype is known before any data is computed, the header is written first and tensors are
streamed after it, one block at a time; nothing is ever held whole in memory.

The sha256 runs in a thread per file (hashlib releases the GIL), so hashing overlaps writing and
computing; a shard's hash may finish while the next shard is being written. sha256 is the
slowest stage of a merge (one core per file: it cannot be split within a file), so the thread
is kept fed and the other work is shared out between the two sides (see `HashingFile`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from adapters.checkpoint import DTYPE_BYTES
from adapters.errors import InputError

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """`"2GB"` -> 2_000_000_000, `"512MiB"` -> 536_870_912 (Hugging Face's convention), ints as bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise InputError(f"--max-shard-size {text!r} is not a size like 2GB or 500MB", param="max_shard_size")
        size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()])
    if size <= 0:
        raise InputError(f"--max-shard-size must be positive, got {text!r}", param="max_shard_size")
    return size


@dataclass(frozen=True)
class Entry:
    """One tensor of an output file: name, safetensors dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def order_for_alignment(entries: list[Entry]) -> list[Entry]:
    """Widest dtypes first (stable), so every tensor's data starts aligned to its element size."""
    return sorted(entries, key=lambda e: -DTYPE_BYTES[e.dtype])


def header_bytes(entries: list[Entry], metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str


class BufferPool:
    """`count` reusable byte buffers of `nbytes` each: `take()` returns a free one or None, `give()` returns it.

    Memory stays at `count × nbytes` however much is written, and no block pays for fresh pages.
    """

    def __init__(self, count: int, nbytes: int):
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(np.empty(nbytes, dtype=np.uint8))

    def take(self) -> np.ndarray | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    def give(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


class HashingFile:
    """A file written piece by piece while a thread computes its sha256, in file order.

    - `write(data)`: the bytes are written at once and the caller may reuse `data`; the thread
      hashes them later, reading them back through a memory map of the file (page cache).
    - `write(data, hashed)`: the caller keeps `data` unchanged until the thread has hashed it from
      memory, while it is likely still in cache, and calls `hashed()`; e.g. a pooled buffer.
    - `copy_range(fd, offset, length, view)`: `length` bytes of another file, by a kernel copy
      (`copy_file_range`, like `cp`); `view` maps the same bytes and is what the thread hashes.

    The caller never waits for the thread: bytes it does not hold are read back from the page
    cache, so its lead costs no memory. Writing and copying are shared out as they come: when the
    thread has less than `HANDOVER` bytes queued it is about to run out of work, and a held write
    or a copy is left to it (it writes or copies the bytes, then hashes them, when it gets there);
    otherwise the caller does it at once. So the copying and writing go to whichever side has time,
    and on a machine where sha256 takes one core the other core's work is what remains. Every
    piece has its offset fixed when it is handed in, so pieces left to the thread leave gaps that
    later writes go past.

    `close()` ends the writing, `record()` waits for the hash and returns it; used as a context
    manager, an exception abandons the hash (the file is being discarded).
    """

    HANDOVER = 4 * 1024 * 1024

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._reader = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = 0  # bytes placed, by either side
        self._queued = 0  # bytes handed to the thread (the writer's count) ...
        self._hashed = 0  # ... and hashed (the thread's count)
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=f"sha256-{self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, data, arg, nbytes = item
            try:
                if self._error is None and not self._abandoned:
                    if kind == "copy":
                        _copy(*arg, self._fd)
                    elif kind == "write":
                        _write(self._fd, data, arg[0])
                    if kind == "range":
                        self._hash_range(arg, nbytes)
                    else:
                        self._hash.update(data)
            except BaseException as exc:  # reported by record(); buffers keep coming back to their pool
                self._error = exc
            if kind in ("write", "held"):
                arg[-1]()
            self._hashed += nbytes

    def _hash_range(self, offset: int, length: int) -> None:
        """Hash bytes already in the file, from the page cache."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(self._reader, offset + length - start, offset=start, prot=mmap.PROT_READ,
                       flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) as mapped:
            with memoryview(mapped) as view, view[offset - start:] as written:
                self._hash.update(written)

    def _put(self, kind: str, data, arg, nbytes: int) -> None:
        self._queued += nbytes
        self._queue.put((kind, data, arg, nbytes))

    def _short_of_work(self) -> bool:
        return self._queued - self._hashed < self.HANDOVER

    def write(self, data, hashed: Callable[[], None] | None = None) -> None:
        view = memoryview(data).cast("B")
        offset = self._size
        self._size += view.nbytes
        if hashed is not None and self._short_of_work():
            self._put("write", view, (offset, hashed), view.nbytes)
            return
        _write(self._fd, view, offset)
        if hashed is None:
            view.release()
            self._put("range", None, offset, self._size - offset)
        else:
            self._put("held", view, (hashed,), view.nbytes)

    def copy_range(self, src_fd: int, offset: int, length: int, view: memoryview) -> None:
        job = (src_fd, offset, self._size, length)
        self._size += length
        if self._short_of_work():
            self._put("copy", view, job, length)
        else:
            _copy(*job, self._fd)
            self._put("view", view, None, length)

    def close(self) -> None:
        """No more writes: the thread finishes its copies and the hash in the background (`record()` waits)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def _finish(self) -> None:
        self.close()
        self._thread.join()
        for fd in (self._fd, self._reader):
            if fd >= 0:
                os.close(fd)
        self._fd = self._reader = -1

    def record(self) -> FileRecord:
        self._finish()
        if self._error is not None:
            raise self._error
        return FileRecord(self.path.name, self._size, self._hash.hexdigest())

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandoned = True
            self._finish()


def _write(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


COPY_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # no in-kernel copy between these files
READ_CHUNK = 4 << 20


def _copy(src_fd: int, src_offset: int, dst_offset: int, length: int, dst_fd: int) -> None:
    """`length` bytes from `src_fd` at `src_offset` to `dst_fd` at `dst_offset`: in the kernel (`copy_file_range`,
    as `cp` does), or through user space where the kernel cannot (another filesystem: EXDEV)."""
    done = 0
    while done < length:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, length - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in COPY_FALLBACK:
                raise
            copied = _copy_through_memory(src_fd, src_offset + done, dst_offset + done, length - done, dst_fd)
        if copied == 0:
            raise InputError("a source file ended early while copying")
        done += copied


def _copy_through_memory(src_fd: int, src_offset: int, dst_offset: int, length: int, dst_fd: int) -> int:
    done = 0
    while done < length:
        chunk = os.pread(src_fd, min(READ_CHUNK, length - done), src_offset + done)
        if not chunk:
            break
        _write(dst_fd, memoryview(chunk), dst_offset + done)
        done += len(chunk)
    return done


def hash_file(path: Path) -> FileRecord:
    """Size and sha256 of a small existing file."""
    data = Path(path).read_bytes()
    return FileRecord(Path(path).name, len(data), hashlib.sha256(data).hexdigest())
