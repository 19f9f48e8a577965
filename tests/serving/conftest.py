"""Fixtures for the serving engine: real PEFT adapters, in-process engines, greedy-comparison helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.merge.helpers import save_peft_adapter

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="session")
def gpt2_tied_base(make_base) -> Path:
    return make_base(arch="gpt2", tie_embeddings=True)


@pytest.fixture(scope="session")
def llama_tied_base(make_base) -> Path:
    return make_base(arch="llama", tie_embeddings=True)


@pytest.fixture(scope="session")
def lora(tmp_path_factory):
    """`lora(base, seed=0, std=0.1, **LoraConfig kwargs) -> Path`: a real PEFT adapter with seeded random
    A and B (large enough to change greedy tokens), on every projection of the base unless told."""
    import json

    made: dict[tuple, Path] = {}

    def make(base: Path, *, seed: int = 0, std: float = 0.1, **options) -> Path:
        arch = json.loads((Path(base) / "config.json").read_text())["model_type"]
        options.setdefault("target_modules", GPT2_TARGETS if arch == "gpt2" else LLAMA_TARGETS)
        options.setdefault("r", 8)
        options.setdefault("lora_alpha", 16)
        key = (str(base), seed, std, repr(sorted(options.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("lora") / "adapter"
            made[key] = save_peft_adapter(base, out, seed=seed, std=std, dtype=torch.float32, **options)
        return made[key]

    return make


def make_engine(base: Path, **config):
    """An in-process `Engine` over `base` (float32 on the CPU)."""
    from transformers import AutoTokenizer

    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.models import load_model

    config.setdefault("max_model_len", 128)
    config.setdefault("max_num_batched_tokens", 512)
    config.setdefault("max_lora_rank", 16)
    config.setdefault("dtype", "float32")
    config.setdefault("device", "cpu")
    cfg = EngineConfig(**config)
    return Engine(load_model(base, cfg), AutoTokenizer.from_pretrained(base), cfg, base)


def assert_greedy_agrees(ours: list[int], reference: list[int], ref_logits, label: str, tol: float = 1e-3) -> None:
    """`ours == reference`, except after a divergence at a near-tie of the reference.

    Different batch shapes round differently (BLAS), so greedy decoding may flip where the
    reference's two best logits are within `tol`; `ref_logits(prefix_tokens)` gives the reference's
    next-token logits after the prompt and `prefix_tokens`, to measure that gap.
    """
    if ours == reference:
        return
    i = next((k for k, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    top2 = ref_logits(reference[:i]).topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < tol, f"{label}: tokens diverge at {i} where the reference's top-2 gap is {gap:.2e} (>= {tol})"


def submit(engine, prompt: list[int], params, adapter=None, user: str = "", request_id: str | None = None) -> list:
    """Queue a request on an in-process engine; returns the list its `Delta`s are appended to."""
    from serving.engine import Sequence

    deltas: list = []
    engine.submit(Sequence(request_id or f"r{id(deltas)}", prompt, params, adapter, user, deltas.append,
                           engine.tokenizer))
    return deltas


def tokens_of(deltas: list) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def register(engine, base, paths: list) -> list:
    """Load adapters into an in-process engine as `/v1/load_lora_adapter` would; returns their refs."""
    from serving.adapter_cache import AdapterRef

    refs = []
    for i, path in enumerate(paths, start=1):
        ref = AdapterRef(i, f"adapter-{i}", Path(path))
        engine.put_adapter(ref, engine.read_adapter(ref))
        refs.append(ref)
    return refs
