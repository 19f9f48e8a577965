"""Write-then-rename helpers: nothing half-written ever looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from adapters.errors import InputError


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, to stable storage (deepest first)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; rename it to `target` on success.

    On any exception the temporary directory is removed and `target` is untouched.
    An existing non-empty `target` is refused unless `overwrite`, in which case it is replaced
    only after the new content is complete. `durable`: the content is fsynced before the rename
    and the parent directory after it, so a finished-looking `target` survives a power loss
    (costs a disk write of everything: about 2 s per GB on this project's machines).
    """
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"output {target} already exists (pass --overwrite to replace it)", param="out")
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        tmp.chmod(0o755)
    except OSError as exc:
        raise InputError(f"cannot write to {parent}: {exc.strerror or exc}", param="out") from exc
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if target.exists():
            old = parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        if durable:
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


FILE_MODE = 0o644  # what every written file gets: `mkstemp` makes its files 0600


def temporary_file(path: Path) -> tuple[int, str]:
    """`mkstemp` beside `path` (same filesystem, so the rename is atomic), with the mode of every other file we
    write: readable by all, as a file copied or saved by transformers is, not mkstemp's owner-only 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and rename."""
    path = Path(path)
    fd, tmp = temporary_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def new_directories_removed_on_error(path: Path) -> Iterator[None]:
    """If the body raises, remove `path` and those of its ancestors that did not exist before it ran, deepest
    first and each only if empty: a command that fails leaves no directories it made (a dataset cache, say)."""
    path = Path(path).absolute()
    new = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for directory in new:
            try:
                directory.rmdir()
            except OSError:  # not empty (someone else's now), or already gone
                break
        raise


def leftovers(target: Path) -> list[Path]:
    """What interrupted `atomic_directory`/`atomic_write_bytes` calls for `target` left beside it."""
    target = Path(target)
    return sorted(p for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*") for p in target.parent.glob(pattern))
