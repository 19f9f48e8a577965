"""The artifact store: where uploaded files, adapters, checkpoints and merged models live.

Keys are relative POSIX paths (`files/file-…`, `adapters/adapter-…/`, `merges/merge-…/`).
The core (`adapters/`, `merge/`) works on local paths, so the interface hands out
`local_path(key)`; on a shared filesystem (the deployment in docker-compose.yml mounts one
volume into the API and every worker) that is the file itself. Every write lands under a
temporary name, is fsynced and is renamed into place: a key either does not exist or is
complete, crash or power loss included.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from adapters.errors import InputError
from adapters.fsutil import atomic_directory


def check_key(key: str) -> str:
    """A key is a relative path of plain names: no `..`, no absolute paths, no empty parts."""
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("..", ".") or p.startswith(".") for p in parts) or "\\" in key:
        raise InputError(f"invalid artifact key {key!r}")
    return key


class ArtifactStore(Protocol):
    def write_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> tuple[int, str]:
        """Copy `stream` to `key`; returns (bytes, sha256 hex). Raises `TooLarge` past `max_bytes`."""

    def import_file(self, key: str, src: Path) -> None:
        """Copy a local file to `key`."""

    def import_dir(self, key: str, src: Path) -> None:
        """Copy a local directory tree to `key` (replacing what was there)."""

    def local_path(self, key: str) -> Path:
        """A local path holding `key`'s content (file or directory)."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove a file or a directory tree; a missing key is not an error."""


class TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class LocalArtifactStore:
    """`ArtifactStore` on a local (or shared, mounted) directory."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self.local_path(key).exists()

    def write_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> tuple[int, str]:
        target = self.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def import_file(self, key: str, src: Path) -> None:
        with open(src, "rb") as f:
            self.write_stream(key, f)

    def import_dir(self, key: str, src: Path) -> None:
        target = self.local_path(key)
        with atomic_directory(target, overwrite=True, durable=True) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
