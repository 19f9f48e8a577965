"""`adapters.basemodel` and `adapters.tokenizer`: what `loramill base create` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.basemodel import BaseModelSpec, create_base_model
from adapters.checkpoint import read_checkpoint
from adapters.errors import InputError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo ✓"}]

# Run with `python -I` from an empty directory and a minimal environment: only transformers,
# no loramill module is imported to load what we wrote.
PLAIN_LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
tok = AutoTokenizer.from_pretrained(path)
prompt = tok.apply_chat_template(json.loads(sys.argv[2]), tokenize=False, add_generation_prompt=True)
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=4, do_sample=False)
print(json.dumps({
    "class": type(model).__name__,
    "dtype": str(model.dtype),
    "tied": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
    "prompt": prompt,
    "prompt_ids": ids[0].tolist(),
    "new_tokens": out.shape[1] - ids.shape[1],
    "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_start|>")],
    "loramill_imported": any(m.split(".")[0] in ("loramill", "adapters") for m in sys.modules),
}))
"""


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(dict(arch="llama", tie_embeddings=True, dtype="bfloat16"), id="llama-tied-bf16"),
        pytest.param(dict(arch="gpt2", tie_embeddings=False), id="gpt2-untied-f32"),
        pytest.param(dict(arch="gpt_neox", tie_embeddings=False), id="gpt-neox-untied-f32"),
    ],
)
def test_loads_with_plain_transformers_in_a_clean_process(make_base, tmp_path, spec):
    base = make_base(**spec)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-I", "-c", PLAIN_LOAD, str(base), json.dumps(CHAT)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["class"] == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                            "gpt_neox": "GPTNeoXForCausalLM"}[spec["arch"]]
    assert got["dtype"] == f"torch.{spec.get('dtype', 'float32')}"
    assert got["tied"] is spec["tie_embeddings"]
    assert got["prompt"] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo ✓<|im_end|>\n<|im_start|>assistant\n"
    assert got["prompt_ids"][:2] == [258, ord("s")]  # <|im_start|> then the bytes of "system"
    assert got["special"] == [256, 257, 256, 258]
    assert 1 <= got["new_tokens"] <= 4
    assert got["loramill_imported"] is False


def test_tokenizer_is_byte_level_and_round_trips(llama_base):
    tok = AutoTokenizer.from_pretrained(llama_base)
    text = "naïve café — 日本 \t\n  two  spaces 🙂"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 259
    chat = CHAT + [{"role": "assistant", "content": "ok"}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\nok<|im_end|>\n")
    ids = tok(rendered, add_special_tokens=False).input_ids
    assert ids.count(258) == 3 and ids.count(257) == 3  # one <|im_start|>, one <|im_end|> per message


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_tied_head_really_shares_the_embedding(make_base, arch):
    tied = AutoModelForCausalLM.from_pretrained(make_base(arch=arch, tie_embeddings=True))
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert "lm_head.weight" not in read_checkpoint(make_base(arch=arch, tie_embeddings=True))
    with torch.no_grad():
        tied.get_input_embeddings().weight[0, 0] += 1.0  # a change to one is a change to both
    assert tied.lm_head.weight[0, 0] == tied.get_input_embeddings().weight[0, 0]

    untied = AutoModelForCausalLM.from_pretrained(make_base(arch=arch, tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.get_input_embeddings().weight)


@pytest.mark.parametrize("dtype,code", [("bfloat16", "BF16"), ("float16", "F16"), ("float32", "F32")])
def test_dtype_is_honoured(make_base, dtype, code):
    base = make_base(arch="llama", dtype=dtype)
    assert {t.dtype for t in read_checkpoint(base).values()} == {code}
    assert json.loads((base / "config.json").read_text())["dtype"] == dtype
    assert AutoModelForCausalLM.from_pretrained(base, dtype="auto").dtype == getattr(torch, dtype)


def test_seed_is_reproducible(tmp_path):
    spec = BaseModelSpec(arch="gpt2", kv_heads=4, layers=1, hidden=64, intermediate=128, seed=7)
    a, b = create_base_model(tmp_path / "a", spec), create_base_model(tmp_path / "b", spec)
    c = create_base_model(tmp_path / "c", BaseModelSpec(**{**spec.__dict__, "seed": 8}))
    ta, tb, tc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["transformer.h.0.attn.c_attn.weight"], tc["transformer.h.0.attn.c_attn.weight"])


def test_shape_options_reach_the_config(tmp_path):
    spec = BaseModelSpec(arch="llama", layers=3, hidden=96, heads=6, kv_heads=3, intermediate=200, vocab=300, max_positions=128)
    config = json.loads((create_base_model(tmp_path / "m", spec) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["vocab_size"], config["max_position_embeddings"]) == (3, 96, 6, 3, 200, 300, 128)
    assert json.loads((tmp_path / "m" / "loramill-base.json").read_text())["kv_heads"] == 3


def test_layout_files_and_permissions(llama_base):
    names = {p.name for p in llama_base.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in llama_base.iterdir())  # readable by the service user
    assert not [p for p in llama_base.parent.iterdir() if ".tmp-" in p.name]  # no temporary left behind
    generation = json.loads((llama_base / "generation_config.json").read_text())
    assert 257 in generation["eos_token_id"] and generation["pad_token_id"] == 256


def test_default_model_trains_quickly(llama_base):
    """The defaults are small enough for CPU training: a few optimiser steps lower the loss."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama_base)
    assert sum(p.numel() for p in model.parameters()) == 451_200
    ids = torch.tensor([list(b"the cat sat on the mat. " * 4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    "overrides,param,fragment",
    [
        (dict(vocab=200), "vocab", "vocab must be at least 259"),
        (dict(hidden=130, heads=4), "heads", "hidden (130) must be divisible by heads (4)"),
        (dict(heads=4, kv_heads=3), "kv_heads", "heads (4) must be divisible by kv_heads (3)"),
        (dict(layers=0), "layers", "layers must be positive"),
        (dict(arch="t5"), "arch", "unknown arch"),
        (dict(dtype="int8"), "dtype", "unknown dtype"),
    ],
)
def test_bad_spec_refused_before_writing(tmp_path, overrides, param, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as err:
        create_base_model(tmp_path / "m", BaseModelSpec(**overrides))
    assert err.value.param == param
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_existing_non_empty_out_dir_refused(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        create_base_model(out, BaseModelSpec(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_existing_empty_out_dir_is_used(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    create_base_model(out, BaseModelSpec(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64))
    assert (out / "model.safetensors").exists()
