"""Reading and validating PEFT adapter directories (headers only)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from adapters.errors import InputError
from adapters.peft_format import read_adapter, read_base, validate_adapter
from tests.merge.helpers import save_peft_adapter


@pytest.fixture(scope="module")
def llama(make_base):
    return make_base(arch="llama")


@pytest.fixture(scope="module")
def patterned(llama, tmp_path_factory):
    return save_peft_adapter(
        llama, tmp_path_factory.mktemp("a") / "adapter", r=4, lora_alpha=16, use_rslora=True,
        target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 8}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2},
    )


def test_reads_ranks_alphas_scales_kinds_and_saved_modules(patterned):
    info = read_adapter(patterned)
    q0, q1 = info.loras["model.layers.0.self_attn.q_proj"], info.loras["model.layers.1.self_attn.q_proj"]
    v0, emb = info.loras["model.layers.0.self_attn.v_proj"], info.loras["model.embed_tokens"]
    assert (q0.rank, q0.alpha, q0.scale) == (4, 16, 16 / math.sqrt(4))
    assert (q1.rank, q1.alpha, q1.scale) == (4, 2, 2 / math.sqrt(4))
    assert (v0.rank, v0.scale, v0.kind) == (8, 16 / math.sqrt(8), "linear")
    assert emb.kind == "embedding" and emb.a.shape == (4, 320) and emb.b.shape == (128, 4)
    assert set(info.saved_modules) == {"lm_head.weight"}
    assert "model.embed_tokens.weight" in info.base_layer_copies  # PEFT's save_embedding_layers copy
    assert info.max_rank == 8


def test_validate_accepts_a_fitting_adapter(patterned, llama):
    assert validate_adapter(patterned, llama, max_rank=8).max_rank == 8


def test_validate_refuses_rank_above_maximum(patterned, llama):
    with pytest.raises(InputError, match=r"rank 8 on 'model.layers.0.self_attn.v_proj' is above the maximum of 4"):
        validate_adapter(patterned, llama, max_rank=4)


def test_validate_names_tensor_and_both_shapes(patterned, make_base):
    other = make_base(arch="llama", hidden=64, heads=2, kv_heads=1, intermediate=160)
    with pytest.raises(InputError) as err:
        validate_adapter(patterned, other, max_rank=64)
    message = str(err.value)
    assert "does not fit base model" in message and "shape" in message
    assert "[64, 64]" in message or "[320, 64]" in message


def test_validate_refuses_missing_target_module(patterned, make_base):
    with pytest.raises(InputError, match="targets module '.*', which base model .* does not have"):
        validate_adapter(patterned, make_base(arch="gpt2"), max_rank=64)


def test_validate_refuses_pickles_and_unsupported_variants(patterned, llama, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(patterned / "adapter_config.json", pickled)
    (pickled / "adapter_model.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"pickled adapter weights \(adapter_model.pt\) are refused"):
        validate_adapter(pickled, llama, max_rank=64)

    dora = tmp_path / "dora"
    shutil.copytree(patterned, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InputError, match=r"DoRA \(use_dora\) adapters are not supported"):
        validate_adapter(dora, llama, max_rank=64)

    wrong_rank = tmp_path / "wrong-rank"
    shutil.copytree(patterned, wrong_rank)
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {}}))
    with pytest.raises(InputError, match="configured rank is 4"):
        read_adapter(wrong_rank)

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no adapter_config.json"):
        read_adapter(tmp_path / "empty")


def test_conv1d_and_tied_heads_are_resolved(make_base, tmp_path):
    from adapters.peft_format import bind_adapter

    gpt2 = make_base(arch="gpt2", tie_embeddings=True)
    base = read_base(gpt2)
    assert base.tied == ("lm_head.weight", "transformer.wte.weight")
    adapter = save_peft_adapter(gpt2, tmp_path / "a", r=2, lora_alpha=4, target_modules=["c_proj", "lm_head"])
    bound = {b.tensor: b.transposed for b in bind_adapter(read_adapter(adapter), base)}
    assert bound["transformer.h.0.attn.c_proj.weight"] is True  # Conv1D, square: found by module, not shape
    assert bound["transformer.h.0.mlp.c_proj.weight"] is True
    assert bound["lm_head.weight"] is False
