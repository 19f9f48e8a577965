"""Tensor bytes <-> numpy arrays for safetensors dtypes, torch-free.

numpy has no bfloat16, so BF16 data travels as uint16 bit patterns:
float32 -> bfloat16 is round-to-nearest-even on the upper 16 bits (what torch's `.to(bfloat16)`
does), bfloat16 -> float32 is a 16-bit left shift (exact).
"""

from __future__ import annotations

import numpy as np

from adapters.checkpoint import TensorInfo
from adapters.errors import InputError

STORAGE = {  # safetensors dtype -> numpy dtype of the stored bytes
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_CODES = ("F32", "F16", "BF16", "F64")


def _row_span(info: TensorInfo, first_row: int, last_row: int | None) -> tuple[type, int, int, tuple[int, ...]]:
    """(storage dtype, byte offset, element count, shape) of rows `[first_row, last_row)`."""
    shape = info.shape or (1,)
    last_row = shape[0] if last_row is None else last_row
    row_items = 1
    for d in shape[1:]:
        row_items *= d
    storage = STORAGE.get(info.dtype)
    if storage is None:
        raise InputError(f"{info.file.name}: tensor {info.name!r} has unsupported dtype {info.dtype}")
    offset = info.data_offset + first_row * row_items * np.dtype(storage).itemsize
    return storage, offset, (last_row - first_row) * row_items, (last_row - first_row, *shape[1:]) if info.shape else ()


def read_raw(info: TensorInfo, file, first_row: int = 0, last_row: int | None = None) -> np.ndarray:
    """Rows `[first_row, last_row)` of a tensor's first dimension as stored, from open binary `file`."""
    storage, offset, count, shape = _row_span(info, first_row, last_row)
    file.seek(offset)
    data = np.empty(count, dtype=storage)
    if file.readinto(memoryview(data).cast("B")) != data.nbytes:
        raise InputError(f"{info.file.name}: truncated safetensors file (tensor {info.name!r})")
    return data.reshape(shape)


def map_rows(info: TensorInfo, mapped, first_row: int = 0, last_row: int | None = None) -> np.ndarray:
    """Rows `[first_row, last_row)` as stored: a read-only view of `mapped`, the file's memory map."""
    storage, offset, count, shape = _row_span(info, first_row, last_row)
    if offset + count * np.dtype(storage).itemsize > len(mapped):
        raise InputError(f"{info.file.name}: truncated safetensors file (tensor {info.name!r})")
    return np.frombuffer(mapped, dtype=storage, count=count, offset=offset).reshape(shape)


def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as float32 (in `out` when given); `raw` itself when already float32."""
    if dtype == "F32":
        return raw
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    if dtype == "BF16":
        bits = out.view(np.uint32)
        np.copyto(bits, raw)
        bits <<= 16
        return out
    np.copyto(out, raw)  # float16 -> float32: exact
    return out


def from_float32(values: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values rounded once to `dtype`, as the stored representation (in `out`, same shape, when given).

    float32 is returned as `values` itself: there is nothing to round.
    """
    if dtype == "F32":
        return values
    storage = STORAGE[dtype]
    if dtype == "BF16":
        bits = values.view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
        return np.right_shift(rounded, np.uint32(16), out=out, dtype=np.uint32, casting="unsafe") if out is not None \
            else (rounded >> 16).astype(np.uint16)
    with np.errstate(over="ignore"):  # overflow to inf is detected by the caller (`is_finite`)
        if out is None:
            return values.astype(storage)
        np.copyto(out, values, casting="unsafe")
        return out


def all_finite(values: np.ndarray) -> bool:
    """True when no float32 value is NaN or infinite: one summation, the element check only if it overflows."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum(dtype=np.float32))) or bool(np.isfinite(values).all())


def is_finite(stored: np.ndarray, dtype: str) -> bool:
    """True when no element of the stored array is NaN or infinite."""
    if dtype == "BF16":
        return not bool(np.any((stored & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    if dtype == "F32":
        return all_finite(stored)
    return bool(np.isfinite(stored).all())


def read_float32(info: TensorInfo) -> np.ndarray:
    """A whole (small) tensor as float32, e.g. a LoRA factor."""
    with open(info.file, "rb") as f:
        return to_float32(read_raw(info, f), info.dtype)
