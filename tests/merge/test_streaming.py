"""Block streaming: how a tensor is cut into blocks, and how buffers are reused, never shows in the output."""

from __future__ import annotations

import hashlib
import json

import pytest

import merge.streaming as streaming
from merge.streaming import AdapterRef, merge_streaming

CASES = [  # (base dtype, --dtype, method)
    ("float32", "auto", "linear"),
    ("bfloat16", "auto", "linear"),
    ("float32", "bfloat16", "linear"),
    ("float16", "float32", "linear"),
    ("float32", "auto", "ties"),
]


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "loramill-manifest.json"}


@pytest.mark.parametrize("base_dtype,dtype,method", CASES, ids=["-".join(c) for c in CASES])
def test_small_blocks_and_a_small_pool_write_the_same_bytes(base_dtype, dtype, method, make_base, make_adapter,
                                                              tmp_path, monkeypatch):
    base = make_base(arch="llama", dtype=base_dtype)
    first = make_adapter(base, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"])
    second = make_adapter(base, seed=1, r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"])
    adapters = [AdapterRef(first, 0.7), AdapterRef(second, 0.5)]
    options = dict(method=method, dtype=dtype, density=0.5 if method == "ties" else None)
    reference = merge_streaming(base, adapters, tmp_path / "whole", **options)

    # Rows of 128 items go 3 to a block (the last block short); rows of 352 items exceed a block and
    # take the unpooled path; two pooled buffers force reuse while the hash thread still works.
    monkeypatch.setattr(streaming, "BLOCK_ELEMENTS", 3 * 128 + 5)
    monkeypatch.setattr(streaming, "POOL_BLOCKS", 2)
    blocked = merge_streaming(base, adapters, tmp_path / "blocked", **options)

    assert _files(blocked.out_dir) == _files(reference.out_dir)
    manifest = json.loads((blocked.out_dir / "loramill-manifest.json").read_text())
    for record in manifest["files"]:
        data = (blocked.out_dir / record["name"]).read_bytes()
        assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest(), record["name"]
    assert manifest["files"] == reference.manifest["files"]


def test_a_progress_callback_that_returns_true_cancels_and_leaves_nothing(make_base, make_adapter, tmp_path, monkeypatch):
    base = make_base(arch="llama")
    adapter = make_adapter(base, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    monkeypatch.setattr(streaming, "BLOCK_ELEMENTS", 1024)
    seen = []

    def progress(done: int, total: int) -> bool:
        seen.append(done)
        return len(seen) == 3

    with pytest.raises(streaming.MergeCancelled):
        merge_streaming(base, [AdapterRef(adapter)], tmp_path / "merged", progress=progress)
    assert len(seen) == 3 and seen[-1] < sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory


def test_progress_reaches_the_total(make_base, make_adapter, tmp_path):
    base = make_base(arch="llama")
    adapter = make_adapter(base, r=4, lora_alpha=8, target_modules=["q_proj"])
    seen = []
    merge_streaming(base, [AdapterRef(adapter)], tmp_path / "merged", progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_hashing_file_hashes_what_it_wrote_held_unheld_and_copied(tmp_path, monkeypatch):
    from merge.writer import HashingFile

    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 1000)
    returned = []
    for handover in (0, 1 << 30):  # every copy made by the writer, then every copy left to the hash thread
        monkeypatch.setattr(HashingFile, "HANDOVER", handover)
        out = tmp_path / f"out-{handover}"
        with HashingFile(out) as file, open(source, "rb") as src, memoryview(source.read_bytes()) as view:
            file.write(b"header")
            for start in range(0, 256_000, 50_001):
                stop = min(start + 50_001, 256_000)
                file.copy_range(src.fileno(), start, stop - start, view[start:stop])
                held = bytearray(b"h" * 4097)
                file.write(held, hashed=lambda held=held: returned.append(held))
                file.write(bytearray(b"u" * 7777))
            record = file.record()
        data = out.read_bytes()
        assert record.size == len(data) == 6 + 256_000 + 6 * (4097 + 7777)
        assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert len(returned) == 12


def test_an_error_while_writing_abandons_the_hash(tmp_path):
    import os

    from merge.writer import HashingFile

    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="stop"), HashingFile(tmp_path / "out") as file:
        file.write(b"x" * (1 << 20))
        raise RuntimeError("stop")
    assert not file._thread.is_alive() and len(os.listdir("/proc/self/fd")) == fds


def test_a_merge_onto_another_filesystem_writes_the_same_bytes(make_base, make_adapter, tmp_path, monkeypatch):
    """The kernel copies untouched tensors (`copy_file_range`) only within one filesystem; across two, the bytes
    go through memory (EXDEV) and the output is the same. Both ways: forced, and a real tmpfs where there is one."""
    import errno
    import os
    import shutil
    import tempfile
    from pathlib import Path

    base = make_base(arch="llama")
    adapters = [AdapterRef(make_adapter(base, target_modules=["q_proj"]))]  # most tensors are copied untouched
    reference = _files(merge_streaming(base, adapters, tmp_path / "same-fs").out_dir)

    def cross_device(*_args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as patched:
        patched.setattr(os, "copy_file_range", cross_device)
        assert _files(merge_streaming(base, adapters, tmp_path / "forced").out_dir) == reference
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        other = Path(tempfile.mkdtemp(dir=shm))
        try:
            assert _files(merge_streaming(base, adapters, other / "merged").out_dir) == reference
        finally:
            shutil.rmtree(other)
