"""The merge against PEFT: tensor by tensor (merge_and_unload) and by logits (unmerged)."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.checkpoint import read_checkpoint, read_safetensors_header
from merge.streaming import AdapterRef, merge_streaming
from tests.merge.helpers import PROBE, checkpoint_logits, load_checkpoint, unmerged_logits

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_CONV1D = ["c_attn", "c_proj", "c_fc"]

# (case id, base spec, LoraConfig kwargs, touches a tied embedding/head)
CASES = [
    ("llama-untied-all-linear", dict(arch="llama"), dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR), False),
    ("llama-untied-rslora-patterns", dict(arch="llama"),
     dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
          rank_pattern={"v_proj": 8, r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"down_proj": 3}), False),
    ("llama-untied-embedding-and-saved-head", dict(arch="llama"),
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]), False),
    ("gpt2-untied-conv1d", dict(arch="gpt2"), dict(r=4, lora_alpha=8, target_modules=GPT2_CONV1D), False),
    ("gpt2-untied-embedding-and-head", dict(arch="gpt2"), dict(r=4, lora_alpha=8, target_modules=["wte", "lm_head", "c_attn"]), False),
    ("llama-tied-untouched-head", dict(arch="llama", tie_embeddings=True), dict(r=4, lora_alpha=8, target_modules=["q_proj"]), False),
    ("llama-tied-lora-head", dict(arch="llama", tie_embeddings=True), dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), True),
    ("llama-tied-lora-embedding", dict(arch="llama", tie_embeddings=True), dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]), True),
    ("llama-tied-saved-head", dict(arch="llama", tie_embeddings=True),
     dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]), True),
    ("gpt2-tied-lora-embedding-and-head", dict(arch="gpt2", tie_embeddings=True),
     dict(r=4, lora_alpha=8, target_modules=["wte", "lm_head", "c_attn"]), True),
]


def _peft_merged_state(base, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize("case,spec,lora,touches_tied", CASES, ids=[c[0] for c in CASES])
def test_merge_matches_peft(case, spec, lora, touches_tied, make_base, make_adapter, tmp_path):
    base = make_base(**spec)
    adapter = make_adapter(base, **lora)
    out = merge_streaming(base, [AdapterRef(adapter)], tmp_path / "merged").out_dir

    merged = load_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    tied_pair = {"lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight"}
    peft_state = _peft_merged_state(base, adapter)
    compared = [name for name in merged if not (touches_tied and name in tied_pair)]
    assert len(compared) >= 10
    for name in compared:
        diff = (merged[name].float() - peft_state[name].float()).abs().max().item()
        assert diff <= 1e-6, f"{name}: max abs diff {diff} vs PEFT merge_and_unload"

    if touches_tied:
        assert config["tie_word_embeddings"] is False and "lm_head.weight" in merged
        assert json.loads((out / "loramill-manifest.json").read_text())["untied_embeddings"] is True
    elif spec.get("tie_embeddings"):
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in merged

    reference = unmerged_logits(base, adapter)
    got = checkpoint_logits(out)
    assert (got - reference).abs().max().item() <= 1e-4
    assert (got - checkpoint_logits(base)).abs().max().item() > 1e-2  # the adapter does change the model


def test_peft_merge_of_a_tied_head_is_wrong_and_ours_is_not(make_base, make_adapter, tmp_path):
    """The reason for untying: PEFT's merged-and-saved model drifts from its unmerged self."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_base(arch="llama", tie_embeddings=True)
    adapter = make_adapter(base, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    peft_out = tmp_path / "peft"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    model.merge_and_unload().save_pretrained(str(peft_out))
    reference = unmerged_logits(base, adapter)
    peft_drift = (checkpoint_logits(peft_out) - reference).abs().max().item()
    ours = merge_streaming(base, [AdapterRef(adapter)], tmp_path / "ours").out_dir
    our_drift = (checkpoint_logits(ours) - reference).abs().max().item()
    assert peft_drift > 0.1 and our_drift < 1e-4


def _fp32_sum(base_dir, adapter_dir, tensor: str) -> torch.Tensor:
    """W (as float32) + the merge's float32 delta, checked against the float64 product."""
    from adapters.peft_format import bind_adapter, read_adapter, read_base
    from merge.deltas import LoraDelta
    from safetensors.torch import load_file

    binding = next(b for b in bind_adapter(read_adapter(adapter_dir), read_base(base_dir)) if b.tensor == tensor)
    delta = torch.from_numpy(LoraDelta.load(binding).rows(0, binding.lora.b.shape[0]))
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    module = tensor.removesuffix(".weight")
    a = lora[f"base_model.model.{module}.lora_A.weight"].double()
    b = lora[f"base_model.model.{module}.lora_B.weight"].double()
    assert (delta.double() - (b @ a) * binding.lora.scale).abs().max().item() <= 1e-6
    return load_checkpoint(base_dir)[tensor].float() + delta


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_base_is_one_rounding_of_the_fp32_sum(dtype, make_base, make_adapter, tmp_path):
    base = make_base(arch="llama", dtype=dtype)
    adapter = make_adapter(base, r=8, lora_alpha=16, target_modules=["q_proj", "gate_proj"])
    out = merge_streaming(base, [AdapterRef(adapter)], tmp_path / "merged").out_dir
    merged, original = load_checkpoint(out), load_checkpoint(base)
    torch_dtype = getattr(torch, dtype)
    for layer in (0, 1):
        for module in (f"model.layers.{layer}.self_attn.q_proj", f"model.layers.{layer}.mlp.gate_proj"):
            name = f"{module}.weight"
            expected = _fp32_sum(base, adapter, name).to(torch_dtype)
            assert merged[name].dtype == torch_dtype
            assert torch.equal(merged[name], expected), name
    for name in original:  # untouched tensors: byte for byte
        if "q_proj" not in name and "gate_proj" not in name:
            assert torch.equal(merged[name], original[name]), name
    reference = unmerged_logits(base, adapter)
    assert (checkpoint_logits(out) - reference).abs().max().item() < 0.1


def test_dtype_option_casts_once_and_updates_config(make_base, make_adapter, tmp_path):
    base = make_base(arch="llama")
    adapter = make_adapter(base, r=4, lora_alpha=8, target_modules=["q_proj"])
    out = merge_streaming(base, [AdapterRef(adapter)], tmp_path / "merged", dtype="bfloat16").out_dir
    merged, original = load_checkpoint(out), load_checkpoint(base)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = _fp32_sum(base, adapter, name).to(torch.bfloat16)
    assert torch.equal(merged[name], expected)
    assert torch.equal(merged["model.norm.weight"], original["model.norm.weight"].to(torch.bfloat16))
    got = checkpoint_logits(out, dtype=torch.bfloat16)
    assert (got - unmerged_logits(base, adapter)).abs().max().item() < 0.1


def test_shards_index_and_manifest(make_base, make_adapter, tmp_path):
    import hashlib

    base = make_base(arch="gpt2")
    adapter = make_adapter(base, r=4, lora_alpha=8, target_modules=GPT2_CONV1D)
    result = merge_streaming(base, [AdapterRef(adapter, 0.5)], tmp_path / "merged", max_shard_size="300KB")
    out = result.out_dir
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 4 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:  # at most 300 KB of tensors, unless one tensor alone is larger
        tensors = read_safetensors_header(shard)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 300_000
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in read_checkpoint(base).values())
    manifest = result.manifest
    assert manifest == json.loads((out / "loramill-manifest.json").read_text())
    listed = {f["name"]: f for f in manifest["files"]}
    on_disk = {p.name for p in out.iterdir()} - {"loramill-manifest.json"}
    assert set(listed) == on_disk and {"tokenizer.json", "generation_config.json", "config.json"} <= on_disk
    for name, record in listed.items():
        data = (out / name).read_bytes()
        assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["adapters"][0]["weight"] == 0.5 and manifest["method"] == {"name": "linear"}
    assert not list(tmp_path.glob(".merged.tmp-*"))
    # weight 0.5 == the adapter at half its scaling
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] *= 0.5
    with torch.no_grad():
        reference = model.eval()(PROBE).logits
    assert (checkpoint_logits(out) - reference).abs().max().item() <= 1e-4
