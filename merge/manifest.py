"""`loramill-manifest.json`: what a merge wrote, from what, and how.

    {
      "format": "loramill-merge/1",
      "loramill_version": "0.1.0",
      "kind": "checkpoint" | "adapter",
      "base": {"path", "model_type", "tensors", "bytes"},
      "adapters": [{"path", "weight", "sha256", "rank", "modules"}],
      "method": {"name", ...its options},
      "dtype": "auto" | "float32" | "bfloat16" | "float16",
      "untied_embeddings": bool,     # lm_head written separately from a tied embedding
      "files": [{"name", "size", "sha256"}]   # every file beside the manifest
    }
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from adapters.fsutil import atomic_write_bytes
from adapters.peft_format import AdapterInfo, BaseWeights
from merge.writer import FileRecord, hash_file

MANIFEST_NAME = "loramill-manifest.json"
FORMAT = "loramill-merge/1"


def build_manifest(*, kind: str, base: BaseWeights, adapters: list[AdapterInfo], weights: list[float],
                   method: dict, dtype: str, untied: bool, files: list[FileRecord]) -> dict:
    from importlib.metadata import version

    return {
        "format": FORMAT,
        "loramill_version": version("loramill"),
        "kind": kind,
        "base": {
            "path": str(base.path.resolve()),
            "model_type": base.config.get("model_type"),
            "tensors": len(base.tensors),
            "bytes": sum(t.nbytes for t in base.tensors.values()),
        },
        "adapters": [
            {"path": str(a.path.resolve()), "weight": w, "sha256": hash_file(a.file).sha256,
             "rank": a.max_rank, "modules": len(a.loras) + len(a.saved_modules)}
            for a, w in zip(adapters, weights, strict=True)
        ],
        "method": method,
        "dtype": dtype,
        "untied_embeddings": untied,
        "files": [asdict(f) for f in sorted(files, key=lambda f: f.name)],
    }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())

