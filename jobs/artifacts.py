"""The artifact store: where uploaded files, adapters, checkpoints and merged models live.

Keys are relative POSIX paths, built by the `*_key` functions below (the one place that knows
the layout): `files/<tenant>/<file>.jsonl`, `adapters/<tenant>/<adapter>/`,
`jobs/<tenant>/<job>/attempt-<n>/` (one training attempt: checkpoints, metrics, its adapter),
`merges/<tenant>/<merge>/`.
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
from adapters.fsutil import atomic_directory, leftovers


def check_key(key: str) -> str:
    """A key is a relative path of plain names: no `..`, no absolute paths, no empty parts."""
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("..", ".") or p.startswith(".") for p in parts) or "\\" in key:
        raise InputError(f"invalid artifact key {key!r}")
    return key


def file_key(tenant_id: str, file_id: str) -> str:
    return f"files/{tenant_id}/{file_id}.jsonl"


def adapter_key(tenant_id: str, adapter_id: str) -> str:
    return f"adapters/{tenant_id}/{adapter_id}"


def job_key(tenant_id: str, job_id: str) -> str:
    return f"jobs/{tenant_id}/{job_id}"


def attempt_key(tenant_id: str, job_id: str, attempt: int) -> str:
    """Where one attempt (claim) of a training job writes: never shared with another attempt."""
    return f"{job_key(tenant_id, job_id)}/attempt-{attempt}"


def merge_key(tenant_id: str, merge_id: str) -> str:
    return f"merges/{tenant_id}/{merge_id}"


class ArtifactStore(Protocol):
    def write_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> tuple[int, str]:
        """Copy `stream` to `key`; returns (bytes, sha256 hex). Raises `TooLarge` past `max_bytes`."""

    def import_file(self, key: str, src: Path) -> None:
        """Copy a local file to `key`."""

    def import_dir(self, key: str, src: Path, names: tuple[str, ...] | None = None) -> None:
        """Copy a local directory tree (or only its files `names`) to `key`, replacing what was there."""

    def local_path(self, key: str) -> Path:
        """A local path holding `key`'s content (file or directory)."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove a file or a directory tree; a missing key is not an error."""

    def prune(self, key: str, keep: set[str]) -> None:
        """Remove everything under directory `key` except the keys in `keep` (and the directories holding them)."""

    def remove_temporaries(self, key: str) -> None:
        """Remove what an interrupted write of `key` left beside it (its temporary and replaced copies)."""


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

    def import_dir(self, key: str, src: Path, names: tuple[str, ...] | None = None) -> None:
        target = self.local_path(key)
        with atomic_directory(target, overwrite=True, durable=True) as tmp:
            if names is None:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            for name in names or ():
                shutil.copy2(Path(src) / name, tmp / name)

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def prune(self, key: str, keep: set[str]) -> None:
        root = self.local_path(key)
        kept = {self.local_path(k) for k in keep}
        holding = {parent for path in kept for parent in path.parents}
        if not root.is_dir():
            return
        for path in sorted(root.iterdir()):
            if path in kept:
                continue
            if path in holding:
                self.prune(path.relative_to(self.root).as_posix(), keep)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def remove_temporaries(self, key: str) -> None:
        for path in leftovers(self.local_path(key)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
