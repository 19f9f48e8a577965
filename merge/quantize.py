"""Int8 weight-only export of a checkpoint, and its loader.

Every 2-D projection weight (`*.weight` of an `nn.Linear` or GPT-2 `Conv1D`, including an
untied `lm_head`) is stored as int8 with one float32 scale per output channel, beside it:

    <name>          I8   same shape as the weight
    <name>_scale    F32  [d_out, 1] for nn.Linear ([d_out, d_in]); [1, d_out] for Conv1D ([d_in, d_out])

    scale = max_j |W_ij| / 127   (over the output channel's inputs; 1 where the channel is all zero)
    q     = clip(round(W / scale), -127, 127)      W ≈ q · scale

Input embeddings, norms and biases are copied unchanged. Streaming like the merge: one
tensor at a time, sharded, sha256 in the manifest. `loramill-int8.json` lists the quantized
tensors; `load_int8` rebuilds the model from its config and loads the dequantized weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters.checkpoint import INDEX_NAME, read_checkpoint, read_config
from adapters.fsutil import atomic_directory
from adapters.layouts import is_conv1d
from adapters.peft_format import EMBEDDING_LEAVES
from merge.manifest import MANIFEST_NAME, write_manifest
from merge.tensorio import FLOAT_CODES, read_raw, to_float32
from merge.writer import Entry, HashingFile, hash_file, header_bytes, order_for_alignment

INT8_NAME = "loramill-int8.json"
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class Int8Result:
    out_dir: Path
    quantized: list[str]
    bytes_before: int
    bytes_after: int


def quantize_rows(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis` (the input dimension)."""
    scale = np.abs(w).max(axis=axis, keepdims=True) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _quantizable(name: str, shape: tuple[int, ...], dtype: str) -> bool:
    parts = name.split(".")
    return len(shape) == 2 and dtype in FLOAT_CODES and parts[-1] == "weight" and parts[-2] not in EMBEDDING_LEAVES \
        and "wpe" not in parts and "embed_positions" not in parts


def export_int8(checkpoint_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                provenance: dict | None = None) -> Int8Result:
    """Write the int8 weight-only export of the (merged) checkpoint at `checkpoint_dir`.

    The manifest's `source` is `provenance` when given (what the merge that made the checkpoint
    did: base, adapters, method, dtype), else the checkpoint's path.
    """
    src = Path(checkpoint_dir)
    tensors = read_checkpoint(src)
    config = read_config(src)
    model_type = config.get("model_type")

    def input_axis(name: str) -> int:
        """The axis a weight's output channel reduces over: 0 for Conv1D ([d_in, d_out]), else 1."""
        return 0 if is_conv1d(model_type, name.rsplit(".", 1)[0]) else 1

    quantized = [n for n, t in tensors.items() if _quantizable(n, t.shape, t.dtype)]
    entries = []
    for name, info in tensors.items():
        if name in quantized:
            scale_shape = (1, info.shape[1]) if input_axis(name) == 0 else (info.shape[0], 1)
            entries += [Entry(name, "I8", info.shape), Entry(name + SCALE_SUFFIX, "F32", scale_shape)]
        else:
            entries.append(Entry(name, info.dtype, info.shape))
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        with HashingFile(tmp / "model-00001-of-00001.safetensors") as file:
            ordered = order_for_alignment(entries)
            file.write(header_bytes(ordered))
            handles: dict[Path, object] = {}

            def values(info) -> np.ndarray:
                f = handles.setdefault(info.file, open(info.file, "rb"))
                return read_raw(info, f)

            # Scales (F32) sort before the int8 weights; computing each twice keeps memory at one tensor.
            for entry in ordered:
                source = entry.name if entry.name in tensors else entry.name.removesuffix(SCALE_SUFFIX)
                info = tensors[source]
                if source not in quantized:
                    file.write(np.ascontiguousarray(values(info)))
                    continue
                q, scale = quantize_rows(to_float32(values(info), info.dtype), input_axis(source))
                file.write(scale if entry.name.endswith(SCALE_SUFFIX) else q)
            for f in handles.values():
                f.close()
            records = [file.record()]
        weight_map = {e.name: file.path.name for e in sorted(entries, key=lambda e: e.name)}
        total = sum(e.nbytes for e in entries)
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / INT8_NAME).write_text(json.dumps({"scheme": "int8 weight-only, symmetric, per output channel",
                                                 "scale_suffix": SCALE_SUFFIX, "quantized": sorted(quantized)}, indent=2) + "\n")
        for path in sorted(src.iterdir()):
            if path.is_file() and not path.name.endswith(".safetensors") and path.name not in (INDEX_NAME, MANIFEST_NAME):
                (tmp / path.name).write_bytes(path.read_bytes())
        records += [hash_file(p) for p in sorted(tmp.iterdir()) if p.name != file.path.name]
        write_manifest(tmp, {"format": "loramill-int8/1", "source": provenance or {"path": str(src.resolve())},
                             "files": [{"name": r.name, "size": r.size, "sha256": r.sha256} for r in records]})
    return Int8Result(Path(out_dir), sorted(quantized), sum(t.nbytes for t in tensors.values()), total)


def load_int8(path: str | Path, *, dtype=None):
    """A transformers model from an int8 export, weights dequantized (`q · scale`) into `dtype`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    spec = json.loads((path / INT8_NAME).read_text())
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    for name in spec["quantized"]:
        state[name] = state[name].float() * state.pop(name + spec["scale_suffix"])
    config = AutoConfig.from_pretrained(str(path))
    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: int8 export does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
