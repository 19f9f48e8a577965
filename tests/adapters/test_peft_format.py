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


@pytest.fixture(scope="module")
def plain(llama, tmp_path_factory):
    return save_peft_adapter(llama, tmp_path_factory.mktemp("plain") / "adapter", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])


def with_config(adapter, tmp_path, raw: bytes):
    out = shutil.copytree(adapter, tmp_path / "changed")
    (out / "adapter_config.json").write_bytes(raw)
    return out


def changed(adapter, tmp_path, **fields):
    config = json.loads((adapter / "adapter_config.json").read_text())
    return with_config(adapter, tmp_path, json.dumps({**config, **fields}).encode())


@pytest.mark.parametrize(("fields", "words"), [
    ({"r": 4.5}, "r must be a positive integer, got 4.5"),
    ({"r": True}, "r must be a positive integer, got True"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 4.0}, "r must be a positive integer, got 4.0"),
    ({"lora_alpha": 1e308}, "lora_alpha must be a number above 0 and at most 1e+06, got 1e+308"),
    ({"lora_alpha": -1}, "lora_alpha must be a number above 0"),
    ({"lora_alpha": "8"}, "lora_alpha must be a number"),
    ({"target_modules": 5}, "target_modules must be a string or a list of strings, got 5"),
    ({"target_modules": ["q_proj", 5]}, "target_modules must be a string or a list of strings"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of strings or null"),
    ({"rank_pattern": {"q_proj": 4.5}}, "rank_pattern['q_proj'] must be a positive integer, got 4.5"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern['q_proj'] must be a number"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"peft_type": ["LORA"]}, "peft_type ['LORA'] is not supported"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern key '(': not a valid regular expression"),
    ({"rank_pattern": {"q(?=_proj)": 4}}, "RE2 cannot run it"),
    ({"rank_pattern": {r"(q)\1": 4}}, "RE2 cannot run it"),
    ({"alpha_pattern": {"q{,3}": 4}}, "mean other things in RE2"),
    ({"rank_pattern": {"(?m:q_proj)": 4}}, "mean other things in RE2"),
    ({"rank_pattern": {"q" * 257: 4}}, "257 characters; at most 256"),
    ({"rank_pattern": {f"k{i}": 4 for i in range(1025)}}, "1025 keys; at most 1024"),
    ({"rank_pattern": {"q_pröj": 4}}, "printable ASCII"),
])
def test_configs_that_lora_config_would_not_take_are_refused(plain, tmp_path, fields, words):
    with pytest.raises(InputError) as info:
        read_adapter(changed(plain, tmp_path, **fields))
    assert words in str(info.value)


@pytest.mark.parametrize(("raw", "words"), [
    (b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_\xff"]}', "not valid UTF-8"),
    (b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"r": NaN, "lora_alpha": 8, "target_modules": "q_proj"}', "NaN is not a JSON number"),
    (b'{"r": Infinity, "lora_alpha": 8, "target_modules": "q_proj"}', "Infinity is not a JSON number"),
    (b'{"r": 4, "lora_alpha": -Infinity, "target_modules": "q_proj"}', "-Infinity is not a JSON number"),
    (b'{"r": 4, "lora_alpha": 8, "target_modules": "q_proj", "x": "' + b"a" * (1 << 20) + b'"}',
     "adapter_config.json is 1048638 bytes; at most 1048576"),
    (b"[4]", "expected a JSON object"),
])
def test_config_files_that_are_not_small_json_objects_are_refused(plain, tmp_path, raw, words):
    with pytest.raises(InputError) as info:
        read_adapter(with_config(plain, tmp_path, raw))
    assert words in str(info.value)


def test_a_redos_key_runs_in_linear_time(plain, llama, tmp_path):
    """`(a+)+` against a module of 5,000 `a`s and a `!`: Python's re would take longer than the universe has."""
    import struct

    from safetensors.numpy import save_file
    import numpy as np

    adapter = changed(plain, tmp_path, rank_pattern={"(a+)+": 2, "q_proj": 8})
    name = "a" * 5000 + "!"
    save_file({f"base_model.model.{name}.lora_A.weight": np.zeros((4, 8), np.float32),
               f"base_model.model.{name}.lora_B.weight": np.zeros((8, 4), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    info = read_adapter(adapter)
    assert info.loras[name].rank == 4  # `(a+)+` does not match the `!`: the default r, as PEFT gives
    with pytest.raises(InputError, match="which base model .* does not have"):
        validate_adapter(adapter, llama, max_rank=64)
    (n,) = struct.unpack("<Q", (adapter / "adapter_model.safetensors").read_bytes()[:8])
    assert n > 10_000  # the name fits the header limit of an adapter for this base


def test_an_adapter_header_is_bounded_by_its_base(plain, llama, tmp_path):
    from adapters.peft_format import adapter_header_limits

    limits = adapter_header_limits(read_base(llama))
    assert limits.max_tensors == 3 * (len(read_base(llama).tensors) + 1)
    adapter = shutil.copytree(plain, tmp_path / "big")
    entries = {f"base_model.model.model.layers.0.m{i}.lora_A.weight": {"dtype": "F32", "shape": [0],
                                                                      "data_offsets": [0, 0]}
               for i in range(limits.max_tensors + 1)}
    raw = json.dumps(entries).encode()
    (adapter / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(InputError, match=rf"{limits.max_tensors + 1} tensors; at most {limits.max_tensors} "
                                         r"\(an adapter for a base of \d+ tensors has at most"):
        validate_adapter(adapter, llama, max_rank=64)
    huge = b'{"a": "' + b"x" * limits.max_bytes + b'"}'
    (adapter / "adapter_model.safetensors").write_bytes(len(huge).to_bytes(8, "little") + huge)
    with pytest.raises(InputError, match=f"header of {len(huge)} bytes is larger than {limits.max_bytes}"):
        validate_adapter(adapter, llama, max_rank=64)


def test_the_rank_is_the_one_peft_uses(plain, llama, tmp_path):
    """r=4.5 was stored as rank 4 (scale alpha/4 where PEFT computes alpha/4.5): now refused; r=4 is exact."""
    info = validate_adapter(plain, llama, max_rank=64)
    assert {m.rank for m in info.loras.values()} == {4} and {m.scale for m in info.loras.values()} == {2.0}
    with pytest.raises(InputError, match="r must be a positive integer, got 4.5"):
        validate_adapter(changed(plain, tmp_path, r=4.5), llama, max_rank=64)
