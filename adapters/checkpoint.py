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

from adapters.errors import InputError
from adapters.layouts import transformers_renames

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024


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


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check it against the file's size.

    Raises `InputError` for a truncated or malformed file, naming the file.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{file.name}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise InputError(f"{file.name}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{file.name}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise InputError(f"{file.name}: corrupt safetensors header")
    base = 8 + n
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{file.name}: corrupt header entry for tensor {name!r}") from exc
        info = TensorInfo(name, file, dtype, shape, base + begin, end - begin)
        width = DTYPE_BYTES.get(dtype)
        if width is not None and info.numel * width != info.nbytes:
            raise InputError(f"{file.name}: tensor {name!r} has {info.nbytes} bytes, its shape {list(shape)} needs {info.numel * width}")
        if base + end > size:
            raise InputError(f"{file.name}: truncated safetensors file (tensor {name!r} ends at byte {base + end}, file has {size})")
        tensors[name] = info
    return tensors


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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise InputError(f"{index}: corrupt shard index") from exc
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
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{model_dir}: no config.json") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON: {exc}") from exc


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
