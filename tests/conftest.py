"""Shared fixtures: small base models made once per test session; a fresh broker of each kind per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.basemodel import BaseModelSpec, create_base_model
from tests.services import BROKERS, fresh_broker


@pytest.fixture(scope="session", autouse=True)
def user_data_dir(tmp_path_factory) -> Path:
    """The per-user data directory (loramill's default, by platformdirs: $XDG_DATA_HOME/loramill) is the
    session's own, so no test (or process it starts) writes into the real one."""
    xdg = tmp_path_factory.mktemp("xdg-data")
    os.environ["XDG_DATA_HOME"] = str(xdg)
    return xdg / "loramill"


@pytest.fixture(scope="session")
def make_base(tmp_path_factory):
    """`make_base(arch="llama", tie_embeddings=False, dtype="float32", **shape) -> Path`, cached."""
    made: dict[tuple, Path] = {}

    def make(**overrides) -> Path:
        spec = BaseModelSpec(**overrides)
        if spec.arch == "gpt2":
            spec = BaseModelSpec(**{**overrides, "kv_heads": spec.heads})
        key = tuple(sorted(overrides.items()))
        if key not in made:
            out = tmp_path_factory.mktemp("base") / f"{spec.arch}-{'tied' if spec.tie_embeddings else 'untied'}-{spec.dtype}"
            made[key] = create_base_model(out, spec)
        return made[key]

    return make


@pytest.fixture(scope="session")
def llama_base(make_base) -> Path:
    return make_base(arch="llama")


@pytest.fixture(scope="session")
def gpt2_base(make_base) -> Path:
    return make_base(arch="gpt2")


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory, llama_base):
    """A real PEFT LoRA adapter (rank 4 on q_proj/v_proj) for the tiny Llama base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.peft_format import quiet_peft_model_init

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.float32)
    with quiet_peft_model_init():
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(params=BROKERS)
def broker_url(request):
    """A broker of its own for the test, once on Redis and once on RabbitMQ: its URL."""
    with fresh_broker(request.param) as url:
        yield url


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of vLLM's CPU build, in its own environment: built on first use (minutes, cached by version
    outside the checkout, `loramill.vllm_env`), found at once after that. Tests using it allow for the build
    in their timeout."""
    from loramill.vllm_env import ensure_vllm_env

    return ensure_vllm_env()
