"""read_safetensors_header: as strict as the safetensors library, bounded before the header is read.

Each malformed file is written by hand and refused with an InputError naming the problem; where
the safetensors library has an opinion, it refuses the same file.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from adapters.checkpoint import HeaderLimits, read_checkpoint, read_safetensors_header
from adapters.errors import InputError


def write_safetensors(path, header: dict | bytes, data: bytes = b"", declared: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


def f32(begin: int, end: int, shape=None) -> dict:
    return {"dtype": "F32", "shape": shape if shape is not None else [(end - begin) // 4], "data_offsets": [begin, end]}


def safetensors_refuses(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            f.keys()
    except Exception:  # noqa: BLE001 — any refusal counts
        return True
    return False


def test_a_valid_file_reads_like_the_safetensors_library(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "ok.safetensors"
    save_file({"b": np.ones((2, 3), np.float32), "a": np.zeros((0, 4), np.float16), "c": np.ones(5, np.int8)},
              str(path), metadata={"format": "pt"})
    tensors = read_safetensors_header(path)
    assert {n: (t.dtype, t.shape, t.nbytes) for n, t in tensors.items()} == {
        "a": ("F16", (0, 4), 0), "b": ("F32", (2, 3), 24), "c": ("I8", (5,), 5)}
    data = path.read_bytes()
    assert data[tensors["b"].data_offset:tensors["b"].data_offset + 24] == np.ones((2, 3), np.float32).tobytes()


CASES = [
    # (name, header, data, words in the message, the safetensors library refuses it too)
    ("string data_offsets", {"t": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, 4, "data_offsets", True),
    ("shape 1e999", b'{"t": {"dtype": "F32", "shape": [1e999, 1], "data_offsets": [0, 4]}}', 4, "shape", True),
    ("dtype in a list", {"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4, "dtype", True),
    ("unknown dtype", {"t": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, 4, "not a safetensors dtype", True),
    ("nested 100,000 deep", b'{"t": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0, "nested too deeply", True),
    ("not UTF-8", b'{"t\xff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, "UTF-8", True),
    ("overlapping offsets", {"a": f32(0, 8), "b": f32(4, 12)}, 12, "overlaps", True),
    ("negative offsets", {"a": f32(0, 4), "b": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, 4,
     "data_offsets", True),
    ("a gap", {"a": f32(0, 4), "b": f32(8, 12)}, 12, "leaves a gap", True),
    ("end before begin", {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, 4, "end before", True),
    ("bytes after the last tensor", {"a": f32(0, 4)}, 8, "after the last tensor", True),
    ("truncated data", {"a": f32(0, 8)}, 4, "truncated", True),
    ("shape against size", {"a": f32(0, 8, shape=[3])}, 8, "needs 12", True),
    ("64-bit overflow", {"a": {"dtype": "F32", "shape": [2**62, 8], "data_offsets": [0, 0]}}, 0, "overflows", True),
    ("a boolean dimension", {"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, "shape", True),
    ("a float offset", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}}, 1, "data_offsets", True),
    ("three offsets", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, 1, "data_offsets", True),
    ("no shape", {"a": {"dtype": "U8", "data_offsets": [0, 1]}}, 1, "no shape", True),
    ("NaN", b'{"a": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 1]}}', 1, "NaN", True),
    ("metadata of numbers", {"__metadata__": {"format": 1}, "a": f32(0, 4)}, 4, "__metadata__", True),
    ("not an object", b"[]", 0, "expected a JSON object", True),
    ("duplicate names", b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                        b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', 2, "duplicate key", None),
]


@pytest.mark.parametrize(("header", "size", "words", "library_refuses"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_malformed_headers_are_refused_naming_the_problem(tmp_path, header, size, words, library_refuses):
    path = write_safetensors(tmp_path / "bad.safetensors", header, b"\0" * size)
    with pytest.raises(InputError) as info:
        read_safetensors_header(path)
    assert words in str(info.value) and str(info.value).startswith("bad.safetensors: ")
    if library_refuses is not None:
        assert safetensors_refuses(path) == library_refuses


def test_limits_refuse_before_the_header_is_read(tmp_path):
    """A header declared at 55 MB is refused from its 8-byte length: the file need not even hold it."""
    path = write_safetensors(tmp_path / "huge.safetensors", b"{", declared=55_000_000)
    with pytest.raises(InputError, match=r"header of 55000000 bytes is larger than 4096 bytes \(an adapter"):
        read_safetensors_header(path, HeaderLimits(max_bytes=4096, what="an adapter for this base has at most 3"))
    with pytest.raises(InputError, match="larger than 100000000 bytes"):  # the format's own limit, by default
        read_safetensors_header(write_safetensors(tmp_path / "h2.safetensors", b"{", declared=100_000_001))

    many = write_safetensors(tmp_path / "many.safetensors", {f"t{i}": f32(4 * i, 4 * i + 4) for i in range(5)},
                             b"\0" * 20)
    assert len(read_safetensors_header(many, HeaderLimits(max_tensors=5))) == 5
    with pytest.raises(InputError, match=r"5 tensors; at most 4 \(too many\)"):
        read_safetensors_header(many, HeaderLimits(max_tensors=4, what="too many"))


def test_base_checkpoints_are_held_to_the_same_rules(make_base, tmp_path):
    """`loramill inspect` and merges read base checkpoints through the same checks."""
    base = shutil.copytree(make_base(arch="llama"), tmp_path / "base")
    weights = base / "model.safetensors"
    tensors = read_checkpoint(base)
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    first, second = sorted((t for t in tensors.values()), key=lambda t: t.data_offset)[:2]
    header[second.name]["data_offsets"][0] -= 4  # overlap the first tensor's last 4 bytes
    header[second.name]["data_offsets"][1] -= 4
    write_safetensors(weights, json.dumps(header).encode(), data[8 + n:])
    with pytest.raises(InputError, match=f"tensor '{second.name}' .* overlaps the tensor before it"):
        read_checkpoint(base)
