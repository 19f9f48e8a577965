"""Streaming a directory as an uncompressed tar, file by file, without building it in memory or on disk."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def tar_stream(root: Path, arcname: str) -> Iterator[bytes]:
    """Yield a POSIX tar of the regular files under `root`, each stored as `arcname/<relative path>`."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = tarfile.TarInfo(f"{arcname}/{path.relative_to(root).as_posix()}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        yield _pad(stat.st_size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
