"""Hugging Face checkpoints read by their safetensors headers, never their weights.

A safetensors file is `u64 little-endian N` + `N bytes of JSON header` + raw tensor bytes; the
header maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` relative to
the end of the header. Reading the headers of a 70B checkpoint takes milliseconds.

Torch-free on purpose: `loramill inspect` and the merge CLI import this first.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import InputError, brief
from adapters.layouts import transformers_renames

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
# Every dtype the safetensors format defines, with its size in bits (safetensors' `Dtype::bitsize`).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
DTYPE_BYTES = {code: bits // 8 for code, bits in DTYPE_BITS.items() if bits % 8 == 0}
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (`MAX_HEADER_SIZE`)
_U64 = 2**64  # offsets, dimensions and sizes are `usize` in safetensors: each must be below this


@dataclass(frozen=True)
class HeaderLimits:
    """How large a safetensors header may be, checked before it is read.

    The defaults are the safetensors library's (100 MB, any number of tensors); an adapter is held
    to what an adapter for its base can have (`adapters.peft_format.adapter_header_limits`).
    `what` names the limit's reason in the refusal.
    """

    max_bytes: int = SAFETENSORS_MAX_HEADER_BYTES
    max_tensors: int | None = None
    what: str = "the safetensors format's limit"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: where it lives and what it is."""

    name: str
    file: Path
    dtype: str  # safetensors dtype code: F32, BF16, F16, ...
    shape: tuple[int, ...]
    data_offset: int  # absolute byte offset of the tensor's data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(file: Path, limits: HeaderLimits = HeaderLimits()) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check it the way the safetensors library does.

    The file is `u64 little-endian N` + N bytes of UTF-8 JSON + the data section. The header is one
    object: `"__metadata__"` (optional, string -> string) and, per tensor, `{"dtype": a safetensors
    dtype, "shape": [non-negative ints], "data_offsets": [begin, end]}` relative to the data section.
    Sorted by offsets, the tensors must tile the data section exactly: the first begins at 0, each
    begins where the one before ends, `end - begin == prod(shape) * dtype bits / 8`, and the last
    ends at the end of the file (safetensors' `Metadata::validate` and `MetadataIncompleteBuffer`).
    No arithmetic overflows 64 bits. Duplicate names and NaN/Infinity are refused too.

    `limits` are checked from the length prefix, before the header is read, and the tensor count
    right after it is parsed (a bounded header is a bounded parse). Raises `InputError` naming the
    file and, where there is one, the tensor.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{file.name}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > limits.max_bytes:
            raise InputError(f"{file.name}: safetensors header of {n} bytes is larger than {limits.max_bytes} "
                             f"bytes ({limits.what})")
        if 8 + n > size:
            raise InputError(f"{file.name}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        raw = f.read(n)
    header = _header_json(file, raw)
    count = len(header) - ("__metadata__" in header)
    if limits.max_tensors is not None and count > limits.max_tensors:
        raise InputError(f"{file.name}: {count} tensors; at most {limits.max_tensors} ({limits.what})")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"{file.name}: corrupt safetensors header: __metadata__ must map strings to strings")
    entries = sorted(((name, _tensor_entry(file, name, meta)) for name, meta in header.items()),
                     key=lambda item: (item[1][2], item[1][3]))
    base, end_of_data = 8 + n, 0
    tensors = {}
    for name, (dtype, shape, begin, end) in entries:
        if begin != end_of_data:
            gap = "overlaps the tensor before it" if begin < end_of_data else "leaves a gap before it"
            raise InputError(f"{file.name}: corrupt safetensors header: tensor {brief(name)} at data_offsets "
                             f"[{begin}, {end}] {gap} (expected it to begin at {end_of_data})")
        bits = _bits(shape, DTYPE_BITS[dtype])
        if bits is None or bits % 8:
            raise InputError(f"{file.name}: corrupt safetensors header: tensor {brief(name)} of shape {brief(list(shape))} "
                             f"and dtype {dtype} overflows 64 bits or is not a whole number of bytes")
        if end - begin != bits // 8:
            raise InputError(f"{file.name}: tensor {brief(name)} has {end - begin} bytes, its shape {brief(list(shape))} "
                             f"needs {bits // 8}")
        end_of_data = end
        tensors[name] = TensorInfo(name, file, dtype, shape, base + begin, end - begin)
    if base + end_of_data > size:
        last = entries[-1][0]
        raise InputError(f"{file.name}: truncated safetensors file (tensor {brief(last)} ends at byte "
                         f"{base + end_of_data}, file has {size})")
    if base + end_of_data < size:
        raise InputError(f"{file.name}: corrupt safetensors file: {size - base - end_of_data} bytes after the last "
                         f"tensor's data (the tensors must cover the data section exactly)")
    return {name: tensors[name] for name in header}  # in the header's order


def _header_json(file: Path, raw: bytes) -> dict:
    """The header bytes as a JSON object; `InputError` for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{file.name}: corrupt safetensors header: not valid UTF-8 (byte {exc.start})") from exc
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise InputError(f"{file.name}: corrupt safetensors header: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, a duplicate key, NaN, an integer of thousands of digits
        raise InputError(f"{file.name}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise InputError(f"{file.name}: corrupt safetensors header: expected a JSON object")
    return header


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {brief(duplicate)}")
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _tensor_entry(file: Path, name: str, meta) -> tuple[str, tuple[int, ...], int, int]:
    """`(dtype, shape, begin, end)` of one header entry, each of the type safetensors requires."""
    def refuse(what: str):
        return InputError(f"{file.name}: corrupt safetensors header: tensor {brief(name)}: {what}")

    if not isinstance(meta, dict):
        raise refuse("expected an object with dtype, shape and data_offsets")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in meta]
    if missing:
        raise refuse(f"no {missing[0]}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise refuse(f"dtype {brief(dtype)} is not a safetensors dtype")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise refuse(f"shape {brief(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(x) for x in offsets):
        raise refuse(f"data_offsets {brief(offsets)} is not two non-negative integers [begin, end]")
    if offsets[1] < offsets[0]:
        raise refuse(f"data_offsets {offsets} end before they begin")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _bits(shape: tuple[int, ...], width: int) -> int | None:
    """`prod(shape) * width`, or None where safetensors' `checked_mul` overflows 64 bits on the way."""
    count = 1
    for d in shape:
        count *= d
        if count >= _U64:
            return None
    return count * width if count * width < _U64 else None


def _is_u64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64




def looks_like_hub_id(text: str) -> bool:
    """`org/name`: one slash, not a relative or absolute path."""
    return text.count("/") == 1 and not text.startswith((".", "/")) and ".." not in text


def read_hub_headers(repo_id: str) -> tuple[dict, dict[str, TensorInfo]]:
    """`config.json` and every tensor's header entry of a hub model, without downloading its weights.

    The safetensors headers come by HTTP range reads (`huggingface_hub.get_safetensors_metadata`,
    a few KB per shard). Each `TensorInfo.file` is the shard's name in the repo and `data_offset`
    is relative to the shard's data section: nothing can be read from them locally.
    """
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        meta = get_safetensors_metadata(repo_id)
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as exc:  # noqa: BLE001 — any hub failure is "not found" to the user
        raise InputError(f"{repo_id}: not a local directory and its safetensors headers could not be read "
                         f"from the hub ({type(exc).__name__})") from exc
    files = list(dict.fromkeys(meta.weight_map.values())) or sorted(meta.files_metadata)
    tensors: dict[str, TensorInfo] = {}
    for filename in files:
        for name, info in meta.files_metadata[filename].tensors.items():
            begin, end = info.data_offsets
            tensors[name] = TensorInfo(name, Path(filename), info.dtype, tuple(info.shape), begin, end - begin)
    return config, tensors


def resolve_model_dir(path_or_id: str | Path) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id fetched to the local cache.

    Raises `InputError` when neither exists.
    """
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{path} is a file; expected a checkpoint directory")
    text = str(path_or_id)
    if looks_like_hub_id(text):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
        except Exception as exc:  # noqa: BLE001 — any hub failure is "not found" to the user
            raise InputError(f"{text}: not a local directory and not fetchable from the hub ({type(exc).__name__})") from exc
    raise InputError(f"{text} does not exist")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors shards in index order; refuses pickle-only checkpoints."""
    index = model_dir / INDEX_NAME
    if index.exists():
        weight_map = _json_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f and Path(f).name == f
                                                       for f in weight_map.values()):
            raise InputError(f"{index}: corrupt shard index: weight_map must map tensor names to shard file names")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise InputError(f"{model_dir}: shard {missing[0]} named in {INDEX_NAME} is missing")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise InputError(f"{model_dir}: only pickled weights ({pickled[0]}); loramill loads safetensors only")
    raise InputError(f"{model_dir}: no safetensors weights found")


def read_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) checkpoint, in file order, by name."""
    tensors: dict[str, TensorInfo] = {}
    for file in safetensors_files(model_dir):
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise InputError(f"{model_dir}: tensor {name!r} appears in both {tensors[name].file.name} and {file.name}")
            tensors[name] = info
    return tensors


def read_config(model_dir: Path) -> dict:
    """`config.json` as a dict; `InputError` when missing or malformed."""
    path = model_dir / "config.json"
    if not path.is_file():
        from adapters.peft_format import CONFIG_NAME as ADAPTER_CONFIG  # peft_format imports this module

        if (model_dir / ADAPTER_CONFIG).is_file():
            base = _json_file(model_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
            of = f" (trained on {base})" if isinstance(base, str) and base else ""
            raise InputError(f"{model_dir} is a LoRA adapter, not a base model: give its base model{of} instead",
                             code="adapter_not_base")
        raise InputError(f"{model_dir}: no config.json; not a Hugging Face model directory")
    return _json_file(path)


def _json_file(path: Path) -> dict:
    """A JSON object from a small file; `InputError` for invalid UTF-8 or JSON, deep nesting, NaN, a non-object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise InputError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError
        raise InputError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InputError(f"{path}: invalid JSON: expected an object")
    return value


def check_target_modules(model_dir: Path, targets: str | tuple[str, ...] | list[str]) -> None:
    """Refuse LoRA target modules the base does not have, from the checkpoint headers alone.

    `targets` is "all-linear" (always fine) or module names; a name matches a module by its last
    dotted component (`q_proj`) or its full name (`model.layers.0.self_attn.q_proj`). A module
    stored under another key (GPT-NeoX's `lm_head` as `embed_out.weight`) is found the way
    transformers finds it, looked up only when a target is not found as stored (see
    `adapters.layouts`).
    """
    if isinstance(targets, str):
        return
    keys = read_checkpoint(model_dir)
    modules = {name.rsplit(".", 1)[0] for name in keys}
    if any(_unknown(targets, modules)):
        modules |= {name.rsplit(".", 1)[0] for name in transformers_renames(read_config(model_dir), keys)}
    unknown = _unknown(targets, modules)
    if unknown:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise InputError(f"unknown target module {unknown[0]!r}; this base has {', '.join(leaves)}",
                         param="targets", code="invalid_value")


def _unknown(targets: tuple[str, ...] | list[str], modules: set[str]) -> list[str]:
    """The targets that name no module, neither by full name nor by last component."""
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    return [t for t in targets if t not in leaves and t not in modules]
