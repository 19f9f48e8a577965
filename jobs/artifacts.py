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

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from adapters.errors import InputError
from adapters.fsutil import atomic_directory, leftovers, temporary_file
from jobs.errors import StorageFull, StorageUnavailable


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


def file_digest(path: Path) -> dict:
    """`{"name", "bytes", "sha256"}` of a stored file: what downloads are checked against."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"name": Path(path).name, "bytes": size, "sha256": digest.hexdigest()}


class ArtifactStore(Protocol):
    def write_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> tuple[int, str]:
        """Copy `stream` to `key`; returns (bytes, sha256 hex). Raises `TooLarge` past `max_bytes`."""

    def directory(self, key: str) -> AbstractContextManager[Path]:
        """A fresh temporary directory that becomes `key` (fsynced, renamed) when the block ends without error."""

    def import_file(self, key: str, src: Path) -> None:
        """Copy a local file to `key`."""

    def import_dir(self, key: str, src: Path, names: tuple[str, ...] | None = None) -> None:
        """Copy a local directory tree (or only its files `names`) to `key`, replacing what was there."""

    def local_path(self, key: str) -> Path:
        """A local path holding `key`'s content (file or directory)."""

    def exists(self, key: str) -> bool: ...

    def removing(self, key: str) -> AbstractContextManager[None]:
        """Delete `key` if and only if the block ends without error (a missing key is not an error)."""

    def discard(self, key: str) -> None:
        """Remove what no row refers to (a refused upload); best effort."""

    def prune(self, key: str, keep: set[str]) -> None:
        """Remove everything under directory `key` except the keys in `keep` (and the directories holding them)."""

    def remove_temporaries(self, key: str) -> None:
        """Remove what an interrupted write of `key` left beside it (its temporary and replaced copies)."""


class TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turn the filesystem's refusals into domain errors that say what happened and leak no path."""
    try:
        yield
    except InputError as exc:  # `atomic_directory` reports a directory it cannot create as bad input
        if isinstance(exc.__cause__, OSError):
            raise _domain(exc.__cause__) from exc
        raise
    except OSError as exc:
        raise _domain(exc) from exc


def _domain(exc: OSError) -> Exception:
    if exc.errno in FULL:
        return StorageFull("The artifact store is full; nothing was stored")
    return StorageUnavailable(f"The artifact store cannot be written ({errno.errorcode.get(exc.errno, 'I/O error')}); "
                              "nothing was changed")


class LocalArtifactStore:
    """`ArtifactStore` on a local (or shared, mounted) directory.

    Deletion moves a key into `<root>/.trash/` first (one rename: atomic, and refused whole on a
    read-only store), so a caller can delete a row only once its files are gone from view, and
    put them back if that fails; the trash is emptied right after, or at the next start.
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.trash = self.root / ".trash"

    def local_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self.local_path(key).exists()

    def write_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None) -> tuple[int, str]:
        target = self.local_path(key)
        with storage_errors():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temporary_file(target)
        digest, size = hashlib.sha256(), 0
        try:
            with storage_errors(), os.fdopen(fd, "wb") as out:
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

    @contextmanager
    def directory(self, key: str) -> Iterator[Path]:
        with storage_errors(), atomic_directory(self.local_path(key), overwrite=True, durable=True) as tmp:
            yield tmp

    def import_file(self, key: str, src: Path) -> None:
        with open(src, "rb") as f:
            self.write_stream(key, f)

    def import_dir(self, key: str, src: Path, names: tuple[str, ...] | None = None) -> None:
        with self.directory(key) as tmp:
            if names is None:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            for name in names or ():
                shutil.copy2(Path(src) / name, tmp / name)

    @contextmanager
    def removing(self, key: str) -> Iterator[None]:
        path = self.local_path(key)
        if not path.exists():
            yield
            return
        with storage_errors():
            self.trash.mkdir(exist_ok=True)
            trashed = Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=self.trash)) / path.name
            os.replace(path, trashed)
        try:
            yield
        except BaseException:
            os.replace(trashed, path)  # the caller could not forget it: it is back where it was
            raise
        self.empty_trash()

    def discard(self, key: str) -> None:
        path = self.local_path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def empty_trash(self) -> None:
        """Remove what deletions moved aside (best effort: whatever stays is retried next time)."""
        if self.trash.is_dir():
            for entry in self.trash.iterdir():
                shutil.rmtree(entry, ignore_errors=True)

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
