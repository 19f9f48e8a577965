"""Shared fixtures: small base models made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.basemodel import BaseModelSpec, create_base_model


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
