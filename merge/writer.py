"""Writing safetensors files tensor by tensor, hashing them (sha256) while they are written.

A safetensors file is `u64 little-endian N` + an `N`-byte JSON header (padded with spaces to a
multiple of 8) + the tensors' bytes, back to back in header order. Since every output shape
and dtype is known before any data is computed, the header is written first and tensors are
streamed after it, one block at a time; nothing is ever held whole in memory.

The sha256 runs in a thread fed with the same buffers the file receives (hashlib releases the
GIL), so hashing overlaps writing and computing; a shard's hash may finish while the next shard
is being written. sha256 is the slowest stage of a merge (about 1.4 GB/s per core with SHA-NI),
so the computing thread must never make it wait: blocks come from a `BufferPool` of reusable
buffers that the hash thread hands back once hashed, and the producer runs ahead by the pool's size.
"""

from __future__ import annotations

import hashlib
import json
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
    """`count` reusable byte buffers of `nbytes` each: `take()` waits for a free one, `give()` returns it.

    Memory stays at `count × nbytes` however much is written, and no block pays for fresh pages
    (first-touch page faults of a new 16 MB array cost more than the arithmetic done in it).
    """

    def __init__(self, count: int, nbytes: int):
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(np.empty(nbytes, dtype=np.uint8))

    def take(self) -> np.ndarray:
        return self._free.get()

    def give(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


class HashingFile:
    """A binary file written sequentially while a thread computes its sha256.

    `write(buffer, hashed=None)` writes user-space bytes and calls `hashed()` from the hash thread
    once they are hashed (e.g. `lambda: pool.give(buffer)`); `copy_range(fd, offset, view)` has
    the kernel copy `len(view)` bytes from another file (`copy_file_range`, like `cp`) while the
    thread hashes `view`, a memory map of the same bytes. `close()` closes the file; `record()`
    waits for the hash. Buffers must not change until hashed.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb", buffering=0)
        self._size = 0
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, name=f"sha256-{self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            view, hashed = item
            self._hash.update(view)
            if hashed is not None:
                hashed()

    def write(self, data, hashed: Callable[[], None] | None = None) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < view.nbytes:
            done += self._file.write(view[done:])
        self._size += view.nbytes
        self._queue.put((view, hashed))

    def copy_range(self, src_fd: int, offset: int, view: memoryview) -> None:
        done = 0
        while done < view.nbytes:
            copied = os.copy_file_range(src_fd, self._file.fileno(), view.nbytes - done, offset + done)
            if copied == 0:
                raise InputError(f"{self.path.name}: source ended early while copying")
            done += copied
        self._size += view.nbytes
        self._queue.put((view, None))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self._queue.put(None)

    def record(self) -> FileRecord:
        self.close()
        self._thread.join()
        return FileRecord(self.path.name, self._size, self._hash.hexdigest())


def hash_file(path: Path) -> FileRecord:
    """Size and sha256 of a small existing file."""
    data = Path(path).read_bytes()
    return FileRecord(Path(path).name, len(data), hashlib.sha256(data).hexdigest())
