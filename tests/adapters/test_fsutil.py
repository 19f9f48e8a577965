"""Write-then-rename directories: complete or absent, and with `durable`, on disk before they look finished."""

from __future__ import annotations

import os

import pytest

import adapters.fsutil as fsutil
from adapters.fsutil import atomic_directory


@pytest.fixture
def journal(monkeypatch):
    """Every fsync (as the path it flushed) and rename, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    monkeypatch.setattr(fsutil.os, "replace", replace)
    return events


def test_durable_flushes_every_file_and_directory_before_the_rename_and_the_parent_after(tmp_path, journal):
    target = tmp_path / "out"
    with atomic_directory(target, durable=True) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    rename = journal.index(("rename", str(tmp)))
    flushed_before = {path for kind, path in journal[:rename] if kind == "fsync"}
    assert flushed_before == {str(tmp / "a.bin"), str(tmp / "sub" / "b.bin"), str(tmp / "sub"), str(tmp)}
    assert journal[rename + 1:] == [("fsync", str(tmp_path))]
    assert (target / "sub" / "b.bin").read_bytes() == b"b"


def test_not_durable_by_default(tmp_path, journal):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.bin").write_bytes(b"a")
    assert [kind for kind, _ in journal] == ["rename"]


def test_a_failure_leaves_the_old_target_and_no_temporary_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True, durable=True) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.bin"]
