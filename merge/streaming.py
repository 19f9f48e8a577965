"""`merge_streaming`: `W_eff = W_base + Δ` written tensor by tensor into a new checkpoint.

The base is read by its safetensors headers; each output tensor is produced in row blocks
(read the block, add the combined delta, round once to the output dtype, write), so memory
holds a few blocks, never the model. Untouched tensors are copied byte for byte by the kernel
(`copy_file_range`, as `cp` does). Every delta is the float32 rounding of an exact product (see
`merge.deltas`), so the bytes do not depend on the machine; it is added to the base block in
float32 and the sum cast once to the output dtype.

Two threads share the work: this one computes; one per file hashes; the writing and copying go
to whichever has time (`HashingFile`), and this thread never waits for the hash. Within a shard
the copied tensors come first: a copy costs little and its hash a lot, so the hash thread has a
backlog to work through while the blocks after it are computed, and no copy is left at the end.

Output (Hugging Face layout, in a temporary directory renamed when complete):
`model-0000N-of-0000M.safetensors`, `model.safetensors.index.json`, `config.json` (dtype, and
`tie_word_embeddings: false` when a tied head was written separately), every other non-weight
file of the base (tokenizer, generation config, chat template), `loramill-manifest.json`.
With a method that `writes_adapter` (`svd`) the output is a PEFT adapter directory instead.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from adapters.checkpoint import DTYPE_BYTES, INDEX_NAME, PICKLE_SUFFIXES, TensorInfo, resolve_model_dir
from adapters.errors import InputError
from adapters.fsutil import atomic_directory
from adapters.peft_format import AdapterInfo, BaseWeights, LoraBinding, bind_adapter, read_adapter, read_base
from merge.deltas import PRODUCT_ELEMENTS, LoraDelta
from merge.manifest import MANIFEST_NAME, build_manifest, write_manifest
from merge.methods import MergeMethod, make_method
from merge.options import DTYPE_CHOICES, OUTPUT_DTYPES, SEED
from merge.tensorio import (
    FLOAT_CODES, STORAGE, all_finite, from_float32, is_finite, map_rows, read_float32, read_raw, to_float32,
)
from merge.writer import (
    BufferPool, Entry, FileRecord, HashingFile, hash_file, header_bytes, order_for_alignment, parse_size,
)

BLOCK_ELEMENTS = 256 * 1024  # rows per block: at most this many elements (1 MB in float32), cache-sized
POOL_BLOCKS = 16  # block buffers the hash thread may hold, to hash them while they are still in cache
COPY_BYTES = 8 * 1024 * 1024  # untouched tensors are copied in slices of this size
Progress = Callable[[int, int], bool | None]  # (bytes done, bytes total) -> True to cancel the merge


class MergeCancelled(Exception):
    """The progress callback asked to stop; the partial output was discarded."""


@dataclass(frozen=True)
class AdapterRef:
    """An adapter directory and its weight in the merge."""

    path: str | Path
    weight: float = 1.0


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    manifest: dict
    files: list[Path]


@dataclass
class _Task:
    """One adapter's contribution to one tensor: a LoRA delta or a saved replacement."""

    adapter: int
    weight: float
    lora: LoraBinding | None = None
    saved: TensorInfo | None = None


@dataclass
class _Output:
    """One output tensor: where its base values come from and what is added to them."""

    name: str
    source: TensorInfo
    dtype: str
    tasks: list[_Task] = field(default_factory=list)

    @property
    def entry(self) -> Entry:
        return Entry(self.name, self.dtype, self.source.shape)

    @property
    def copied(self) -> bool:
        """Written byte for byte from the base (nothing added, same dtype)."""
        return not self.tasks and self.dtype == self.source.dtype


def _check_weights(adapters: list[AdapterRef]) -> list[float]:
    if not adapters:
        raise InputError("give at least one adapter", param="adapter")
    weights = []
    for ref in adapters:
        try:
            weight = float(ref.weight)
        except (TypeError, ValueError) as exc:
            raise InputError(f"adapter weight {ref.weight!r} for {ref.path} is not a number", param="adapter") from exc
        if not np.isfinite(weight):
            raise InputError(f"adapter weight {ref.weight!r} for {ref.path} is not a finite number", param="adapter")
        weights.append(weight)
    return weights


def _output_dtype(dtype: str) -> str | None:
    """None for "auto" (keep each tensor's dtype), else a safetensors code."""
    if dtype == "auto":
        return None
    if dtype not in OUTPUT_DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; expected {', '.join(DTYPE_CHOICES)}", param="dtype")
    return OUTPUT_DTYPES[dtype]


def _plan(base: BaseWeights, adapters: list[AdapterInfo], bindings: list[list[LoraBinding]],
          weights: list[float], out_dtype: str | None) -> tuple[list[_Output], bool]:
    """Every output tensor in base file order; unties a tied head that an adapter touches."""
    tasks: dict[str, list[_Task]] = {}
    for i, (adapter, bound) in enumerate(zip(adapters, bindings, strict=True)):
        for b in bound:
            tasks.setdefault(b.tensor, []).append(_Task(i, weights[i], lora=b))
        for tensor, info in adapter.saved_modules.items():
            tasks.setdefault(base.key(tensor), []).append(_Task(i, weights[i], saved=info))
    untie = base.tied is not None and any(name in tasks for name in base.tied)
    outputs = []
    for name, info in sorted(base.tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].data_offset)):
        dtype = out_dtype if out_dtype and info.dtype in FLOAT_CODES else info.dtype
        outputs.append(_Output(name, info, dtype, tasks.get(name, [])))
        if untie and name == base.tied[1]:
            head = base.tied[0]
            outputs.append(_Output(head, info, dtype, tasks.get(head, [])))
    return outputs, untie


def _shards(outputs: list[_Output], max_bytes: int) -> list[list[_Output]]:
    shards: list[list[_Output]] = [[]]
    size = 0
    for out in outputs:
        if shards[-1] and size + out.entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.entry.nbytes
    return shards


def _check_adapters_finite(adapters: list[AdapterInfo]) -> None:
    for adapter in adapters:
        infos = [t for m in adapter.loras.values() for t in (m.a, m.b)] + list(adapter.saved_modules.values())
        for info in infos:
            if not np.isfinite(read_float32(info)).all():
                raise InputError(f"adapter {adapter.path}: tensor {info.name!r} contains NaN or inf")


class _Merger:
    """Produces output tensors block by block from open base files.

    A block is at most `BLOCK_ELEMENTS` elements of whole rows, cache-sized. Its stored bytes are
    produced in a buffer from a `BufferPool` and handed to the file, which writes and hashes it
    and gives it back; when the pool is out, in a spare buffer that is written at once and hashed
    later from the page cache, so computing never waits for hashing (see `HashingFile`). Deltas
    go to reusable float32 scratch arrays and their exact products to one float64 scratch.
    Nothing is allocated per block, so memory is `POOL_BLOCKS + 2 + adapters` blocks whatever
    the model's size. Methods that need a whole tensor at once (`ties`, `dare_*`) work on whole
    tensors instead.
    """

    def __init__(self, method: MergeMethod, stack: ExitStack):
        self.method = method
        self.stack = stack
        self.files: dict[Path, object] = {}
        self.maps: dict[Path, mmap.mmap] = {}
        self.pool = BufferPool(POOL_BLOCKS, BLOCK_ELEMENTS * 4)  # blocks handed to the hash thread
        self.spare = np.empty(BLOCK_ELEMENTS * 4, dtype=np.uint8)  # when the pool is out: written, reused at once
        self.scratch: list[np.ndarray] = []  # float32: [0] base values when converted, [1:] deltas
        self.products = np.empty(PRODUCT_ELEMENTS)  # float64: exact delta rows before their one rounding

    def _file(self, path: Path):
        if path not in self.files:
            self.files[path] = self.stack.enter_context(open(path, "rb"))
        return self.files[path]

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self.maps:
            # Not closed explicitly: views being hashed may still reference it; freed with the merger.
            self.maps[path] = mmap.mmap(self._file(path).fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[path]

    def _work(self, index: int, count: int) -> np.ndarray:
        """Scratch float32 array `index`, first `count` elements."""
        while len(self.scratch) <= index:
            self.scratch.append(np.empty(BLOCK_ELEMENTS, dtype=np.float32))
        return self.scratch[index][:count]

    def write_tensor(self, out: _Output, file: HashingFile, advance: Callable[[int], None]) -> None:
        src = out.source
        if out.copied:  # a kernel copy, as `cp` makes
            end = src.data_offset + src.nbytes
            view = memoryview(self._map(src.file))
            for start in range(src.data_offset, end, COPY_BYTES):
                stop = min(start + COPY_BYTES, end)
                file.copy_range(self._file(src.file).fileno(), start, stop - start, view[start:stop])
                advance(stop - start)
            return
        rows = src.shape[0] if src.shape else 1
        row_items = max(src.numel, 1) // rows
        blocked = row_items <= BLOCK_ELEMENTS and (self.method.elementwise or not out.tasks)
        step = BLOCK_ELEMENTS // row_items if blocked else rows
        loras = {id(t): LoraDelta.load(t.lora) for t in out.tasks if t.lora is not None}
        for first in range(0, rows, step):
            held = self.pool.take() if blocked else None
            buffer = held if held is not None else self.spare if blocked else None
            stored = self._block(out, first, min(first + step, rows), loras, buffer)
            if held is not None:
                file.write(stored, hashed=lambda held=held: self.pool.give(held))
            else:
                file.write(stored)  # hashed back from the page cache
            advance(stored.nbytes)

    def _block(self, out: _Output, first: int, last: int, loras: dict[int, LoraDelta],
               buffer: np.ndarray | None) -> np.ndarray:
        """Rows `[first, last)` of the output tensor as stored (in `buffer` when given).

        Base values are read in place from the mapped file; float32 results are computed straight
        into the output buffer when float32 is what is stored.
        """
        src = out.source
        raw = map_rows(src, self._map(src.file), first, last)
        if src.dtype not in FLOAT_CODES:
            return raw
        count = raw.size
        stored_out = None
        if buffer is not None:
            stored_out = buffer[:count * DTYPE_BYTES[out.dtype]].view(STORAGE[out.dtype]).reshape(raw.shape)
        if out.dtype == "F32" and stored_out is not None:
            target = stored_out
        else:
            target = self._work(0, count).reshape(raw.shape) if buffer is not None else np.empty(raw.shape, np.float32)
        tasks = out.tasks
        if not tasks:
            return from_float32(to_float32(raw, src.dtype, out=target), out.dtype, out=stored_out)
        if self.method.exact and len(tasks) == 1 and tasks[0].saved is not None and tasks[0].weight == 1.0:
            values = self._saved_rows(tasks[0].saved, first, last)  # written as trained, not W + (W' - W)
        else:
            base_values = to_float32(raw, src.dtype, out=target)  # float32 sources: the mapped bytes themselves
            deltas = []
            for i, t in enumerate(tasks):
                if t.lora is not None:
                    rows_out = self._work(i + 1, count).reshape(raw.shape) if buffer is not None else None
                    deltas.append(loras[id(t)].rows(first, last, out=rows_out, scratch=self.products))
                else:
                    deltas.append(self._saved_rows(t.saved, first, last) - base_values)
            values = np.add(base_values, self.method.combine(deltas, [t.weight for t in tasks], out.name), out=target)
        stored = from_float32(values, out.dtype, out=stored_out)
        if not is_finite(stored, out.dtype):
            problem = f"overflows {out.dtype}" if all_finite(values) else "contains NaN or inf"
            raise InputError(f"merged tensor {out.name!r} {problem}; the output was discarded")
        return stored

    def _saved_rows(self, saved: TensorInfo, first: int, last: int) -> np.ndarray:
        return to_float32(read_raw(saved, self._file(saved.file), first, last), saved.dtype)


def _blas_threads() -> int:
    """BLAS threads for the delta products: every core but the one the sha256 thread needs.

    sha256 is the slowest stage; idle BLAS threads spin for a while after each product, and on a
    small machine they would take its core.
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _copy_side_files(base_dir: Path, out_dir: Path, config: dict) -> list[FileRecord]:
    """config.json (as given) plus every non-weight file of the base, hashed."""
    records = []
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    records.append(hash_file(out_dir / "config.json"))
    skip = {"config.json", INDEX_NAME, MANIFEST_NAME}
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and path.name not in skip and not path.name.startswith(".") \
                and path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
            shutil.copyfile(path, out_dir / path.name)
            records.append(hash_file(out_dir / path.name))
    return records


def _output_config(base: BaseWeights, dtype: str, untie: bool) -> dict:
    config = dict(base.config)
    if untie:
        config["tie_word_embeddings"] = False
    if dtype != "auto":
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    return config


def _write_checkpoint(tmp: Path, base: BaseWeights, outputs: list[_Output], shards: list[list[_Output]],
                      method: MergeMethod, progress: Progress | None) -> list[FileRecord]:
    total = sum(o.entry.nbytes for o in outputs)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress and progress(done, total):
            raise MergeCancelled(f"cancelled after {done} of {total} bytes")

    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with ExitStack() as stack:
        merger = _Merger(method, stack)
        files = []
        for name, shard in zip(names, shards, strict=True):
            ordered = order_for_alignment(sorted(shard, key=lambda o: not o.copied))
            file = stack.enter_context(HashingFile(tmp / name))
            files.append(file)
            file.write(header_bytes([o.entry for o in ordered]))
            for out in ordered:
                merger.write_tensor(out, file, advance)
            file.close()  # its hash finishes while the next shard is written
        records = [f.record() for f in files]
    index = {"metadata": {"total_size": total},
             "weight_map": {o.name: names[i] for i, shard in enumerate(shards) for o in sorted(shard, key=lambda o: o.name)}}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return records + [hash_file(tmp / INDEX_NAME)]


def check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty `out_dir` unless `overwrite` (before any work, not after it)."""
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"output {out_dir} already exists (pass --overwrite to replace it)", param="out")


def merge_streaming(base_dir: str | Path, adapters: list[AdapterRef], out_dir: str | Path, *,
                    method: str | MergeMethod = "linear", dtype: str = "auto", max_shard_size: str | int = "2GB",
                    density: float | None = None, drop_rate: float | None = None, rank: int | None = None,
                    seed: int | None = None, overwrite: bool = False, progress: Progress | None = None, durable: bool = False,
                    before_commit: Callable[[Path], None] | None = None) -> MergeResult:
    """Merge `adapters` into the base checkpoint at `base_dir`, writing `out_dir`.

    `method`: a registry name with its options (`density`, `drop_rate`, `rank`, `seed`; see
    `merge.methods`), or a `MergeMethod` already built (then those options are not given).

    Every input is checked (by headers) before anything is written; `before_commit(tmp_dir)`
    runs on the complete output before it is renamed into place (e.g. verification) and may
    raise to discard it. Raises `InputError` for any bad input; `out_dir` is then untouched.
    `progress(done_bytes, total_bytes)` is called as tensors are written; when it returns True
    the merge stops with `MergeCancelled`, again leaving `out_dir` untouched. `durable`: fsync the
    output before it is renamed into place (see `atomic_directory`).
    """
    weights = _check_weights(adapters)
    if isinstance(method, MergeMethod):
        if (density, drop_rate, rank, seed) != (None, None, None, None):
            raise TypeError("give a built MergeMethod without options, or a method name with them")
        merge_method = method
    else:
        merge_method = make_method(method, density=density, drop_rate=drop_rate, rank=rank,
                                   seed=SEED.default if seed is None else seed)
    out_dtype = _output_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    base = read_base(resolve_model_dir(base_dir))
    infos = [read_adapter(ref.path) for ref in adapters]
    bindings = [bind_adapter(info, base) for info in infos]
    _check_adapters_finite(infos)
    with atomic_directory(out_dir, overwrite=overwrite, durable=durable) as tmp:
        if merge_method.writes_adapter:
            records = merge_method.write_adapter(tmp, base, infos, bindings, weights, out_dtype)
            kind, untie = "adapter", False
        else:
            outputs, untie = _plan(base, infos, bindings, weights, out_dtype)
            with threadpool_limits(_blas_threads(), user_api="blas"):
                records = _write_checkpoint(tmp, base, outputs, _shards(outputs, max_bytes), merge_method, progress)
            records += _copy_side_files(base.path, tmp, _output_config(base, dtype, untie))
            kind = "checkpoint"
        manifest = build_manifest(kind=kind, base=base, adapters=infos, weights=weights, method=merge_method.describe(),
                                  dtype=dtype, untied=untie, files=records)
        write_manifest(tmp, manifest)
        if before_commit:
            before_commit(tmp)
    return MergeResult(out_dir, manifest, [out_dir / r.name for r in records] + [out_dir / MANIFEST_NAME])
