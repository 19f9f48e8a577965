"""Writing safetensors files tensor by tensor, hashing them (sha256) while they are written.

A safetensors file is `u64 little-endian N` + an `N`-byte JSON header (padded with spaces to a
multiple of 8) + the tensors' bytes, back to back in header order. Since every output shape
and dtype is known before any data is computed, the header is written first and tensors are
streamed after it, one block at a time; nothing is ever held whole in memory.

The sha256 runs in a thread that reads the file back from the page cache as it is written
(hashlib releases the GIL), so hashing overlaps writing and computing; a shard's hash may finish
while the next shard is being written. sha256 is the slowest stage of a merge (one core per
file: it cannot be split within a file), so nothing makes it wait but the file's growth.
"""

from __future__ import annotations

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


class HashingFile:
    """A binary file written sequentially while a thread computes its sha256 from the written pages.

    `write(data)` writes user-space bytes, `copy_range(fd, offset, length)` has the kernel copy
    bytes from another file (`copy_file_range`, like `cp`). A thread hashes the file as it grows,
    reading what was written back through a read-only memory map of the file itself: the page
    cache holds those bytes anyway, so the hash costs no copy and no memory of ours, the writer
    may reuse its buffer as soon as `write` returns, and it never waits for the hash however far
    ahead it runs. `close()` ends the writing, `record()` waits for the hash and returns it; used
    as a context manager, an exception abandons the hash (the file is being discarded).
    """

    WINDOW = 64 * 1024 * 1024  # bytes mapped at a time by the hash thread

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb", buffering=0)
        self._reader = os.open(self.path, os.O_RDONLY)
        self._size = 0
        self._hash = hashlib.sha256()
        self._ends: queue.SimpleQueue = queue.SimpleQueue()  # file sizes written so far; None: closed
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=f"sha256-{self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        done = 0
        try:
            while (end := self._ends.get()) is not None:
                while done < end and not self._abandoned:
                    start = done - done % mmap.ALLOCATIONGRANULARITY
                    stop = min(end, start + self.WINDOW)
                    with mmap.mmap(self._reader, stop - start, offset=start, prot=mmap.PROT_READ,
                                   flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) as mapped:
                        with memoryview(mapped) as view, view[done - start:] as written:
                            self._hash.update(written)
                    done = stop
        except BaseException as exc:  # reported by record()
            self._error = exc

    def write(self, data) -> None:
        with memoryview(data) as raw, raw.cast("B") as view:
            done = 0
            while done < view.nbytes:
                done += self._file.write(view[done:])
        self._grown(done)

    def copy_range(self, src_fd: int, offset: int, length: int) -> None:
        done = 0
        while done < length:
            copied = os.copy_file_range(src_fd, self._file.fileno(), length - done, offset + done)
            if copied == 0:
                raise InputError(f"{self.path.name}: source ended early while copying")
            done += copied
        self._grown(length)

    def _grown(self, nbytes: int) -> None:
        if nbytes:
            self._size += nbytes
            self._ends.put(self._size)

    def close(self) -> None:
        """No more writes: the hash finishes in the background (`record()` waits for it)."""
        if not self._file.closed:
            self._file.close()
            self._ends.put(None)

    def _finish(self) -> None:
        self.close()
        self._thread.join()
        if self._reader >= 0:
            os.close(self._reader)
            self._reader = -1

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


def hash_file(path: Path) -> FileRecord:
    """Size and sha256 of a small existing file."""
    data = Path(path).read_bytes()
    return FileRecord(Path(path).name, len(data), hashlib.sha256(data).hexdigest())
