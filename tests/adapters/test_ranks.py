"""How "auto" sharding picks DDP or FSDP: from the base's weight bytes against one device's memory, no GPU needed."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from adapters.checkpoint import read_checkpoint
from adapters.ranks import FSDP_ABOVE, choose_sharding
from adapters.training import TrainingConfig

GIB = 2**30


@pytest.mark.parametrize("base_bytes, device_bytes, chosen", [
    (14 * GIB, 80 * GIB, "ddp"),  # a 7B base in bf16 on an 80 GB GPU: a copy per GPU leaves room to train
    (40 * GIB, 80 * GIB, "ddp"),  # exactly half: still DDP
    (40 * GIB + 1, 80 * GIB, "fsdp"),
    (140 * GIB, 80 * GIB, "fsdp"),  # 70B in bf16 cannot fit one GPU at all
    (14 * GIB, 24 * GIB, "fsdp"),  # fits, but leaves too little beside it for activations
    (140 * GIB, None, "ddp"),  # CPU ranks: no device memory to fit, they share the host's
])
def test_auto_shards_a_base_above_half_a_device(base_bytes, device_bytes, chosen):
    assert FSDP_ABOVE == 0.5
    assert choose_sharding("auto", base_bytes, device_bytes) == chosen


@pytest.mark.parametrize("requested", ["ddp", "fsdp"])
def test_an_explicit_sharding_is_kept_whatever_the_sizes(requested):
    assert choose_sharding(requested, 1, 80 * GIB) == choose_sharding(requested, 140 * GIB, 80 * GIB) == requested


def test_launch_settles_auto_from_the_checkpoint_headers_and_the_smallest_gpu(llama_base, monkeypatch):
    """`launch`'s choice, with the CUDA queries faked: the base's bytes come from its safetensors headers."""
    import torch

    from adapters.distributed import _settle_sharding

    cfg = TrainingConfig(base=str(llama_base), data="unused.jsonl", out="unused", devices=2)
    base_bytes = sum(t.nbytes for t in read_checkpoint(llama_base).values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _settle_sharding(cfg).sharding == "ddp"
    memories = {0: 8 * base_bytes, 1: base_bytes}  # the second GPU is the one that decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=memories[i]))
    assert _settle_sharding(cfg).sharding == "fsdp"
    memories[1] = 8 * base_bytes
    assert _settle_sharding(cfg).sharding == "ddp"
    assert _settle_sharding(replace(cfg, sharding="fsdp")).sharding == "fsdp"
