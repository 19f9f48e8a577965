"""The model runners with batched LoRA slots against PEFT and plain transformers (float32).

One forward pass carries prompts for several adapters and for the base model at once; each prompt's
logits must match PEFT's for its adapter alone within 1e-4, and base rows the base model alone.
"""

from __future__ import annotations

import json

import pytest
import torch

from adapters.errors import InputError
from serving.adapter_cache import AdapterCache, AdapterRef, read_adapter_weights
from serving.config import EngineConfig
from serving.models import build_batch, load_model

PROMPTS = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [84, 104, 101, 32, 99, 97, 112],
           [258, 117, 115, 101, 114, 10, 50, 43, 50, 61, 63, 257, 10, 258], [49, 50, 51]]
TOL = 1e-4


def _reference(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _load(base, adapters: list, **config):
    cfg = EngineConfig(max_num_seqs=8, max_model_len=64, max_num_batched_tokens=256, max_loras=4, max_lora_rank=16,
                       dtype="float32", device="cpu", **config)
    model = load_model(base, cfg)
    cache = AdapterCache(model, cfg)
    slots = []
    for i, path in enumerate(adapters, start=1):
        ref = AdapterRef(i, f"a{i}", path)
        cache.put_host(i, read_adapter_weights(ref, model, base, cfg))
        slots.append(cache.acquire(i))
    return model, slots


def _check_mixed_batch(base, adapters: list):
    """Prefill + one decode step of PROMPTS x [base, *adapters] in one batch, each against PEFT alone."""
    model, slots = _load(base, adapters)
    cases = [(prompt, a) for a in range(len(adapters) + 1) for prompt in PROMPTS][:model.kv.rows]
    refs = [_reference(base, None)] + [_reference(base, path) for path in adapters]
    batch = build_batch([], [(row, prompt, [0, *slots][a]) for row, (prompt, a) in enumerate(cases)],
                        device=model.device, dtype=model.dtype)
    with torch.inference_mode():
        logits = model.forward(batch)
    nexts = []
    for row, (prompt, a) in enumerate(cases):
        expected = _last_logits(refs[a], prompt)
        torch.testing.assert_close(logits[row], expected, rtol=0, atol=TOL, msg=f"prefill of case {row}")
        nexts.append(int(expected.argmax()))
    decodes = [(token, len(prompt), [0, *slots][a]) for token, (prompt, a) in zip(nexts, cases)]
    with torch.inference_mode():
        logits = model.forward(build_batch(decodes, [], device=model.device, dtype=model.dtype))
    for row, (prompt, a) in enumerate(cases):
        torch.testing.assert_close(logits[row], _last_logits(refs[a], prompt + [nexts[row]]), rtol=0, atol=TOL,
                                   msg=f"decode of case {row}")


def test_llama_mixed_batch_matches_peft(llama_base, lora):
    _check_mixed_batch(llama_base, [lora(llama_base, seed=1), lora(llama_base, seed=2, r=4, target_modules=["q_proj", "v_proj"])])


def test_gpt2_conv1d_tied_head_mixed_batch_matches_peft(gpt2_tied_base, lora):
    _check_mixed_batch(gpt2_tied_base, [lora(gpt2_tied_base, seed=3), lora(gpt2_tied_base, seed=4, r=2)])


def test_rslora_and_rank_and_alpha_patterns(llama_base, lora):
    _check_mixed_batch(llama_base, [
        lora(llama_base, seed=5, use_rslora=True, r=16, lora_alpha=8),
        lora(llama_base, seed=6, r=8, lora_alpha=16, rank_pattern={"o_proj": 2, "layers.1.mlp.down_proj": 12},
             alpha_pattern={"q_proj": 3, "gate_proj": 40}),
    ])


def test_lora_on_embedding_and_head_of_a_tied_model(llama_tied_base, lora):
    _check_mixed_batch(llama_tied_base, [
        lora(llama_tied_base, seed=7, target_modules=["embed_tokens", "lm_head", "q_proj"]),
        lora(llama_tied_base, seed=8, target_modules=["embed_tokens", "v_proj"]),
    ])


def test_modules_to_save_head_gets_a_per_slot_copy(llama_base, lora):
    _check_mixed_batch(llama_base, [lora(llama_base, seed=9, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                    lora(llama_base, seed=10)])


def test_base_rows_in_a_mixed_batch_match_the_base_alone(llama_base, lora):
    model, slots = _load(llama_base, [lora(llama_base, seed=1), lora(llama_base, seed=2)])
    alone = []
    for prompt in PROMPTS:
        with torch.inference_mode():
            alone.append(model.forward(build_batch([], [(0, prompt, 0)], device=model.device, dtype=model.dtype))[0])
    mixed = [(row, prompt, [0, slots[0], 0, slots[1]][row]) for row, prompt in enumerate(PROMPTS)]
    with torch.inference_mode():
        logits = model.forward(build_batch([], mixed, device=model.device, dtype=model.dtype))
    for row in (0, 2):
        torch.testing.assert_close(logits[row], alone[row], rtol=0, atol=1e-5)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom", "architectures": ["BloomForCausalLM"]}))
    with pytest.raises(InputError, match="BloomForCausalLM.*not supported by the loramill engine"):
        load_model(tmp_path, EngineConfig())


def test_refusals_name_the_problem(llama_base, lora):
    cfg = EngineConfig(max_num_seqs=2, max_model_len=32, max_lora_rank=4, max_saved_module_bytes=1000, device="cpu")
    model = load_model(llama_base, cfg)
    with pytest.raises(InputError, match=r"rank 8 .* above the engine's max_lora_rank of 4"):
        read_adapter_weights(AdapterRef(1, "big", lora(llama_base, seed=1)), model, llama_base, cfg)
    saved_norm = lora(llama_base, seed=2, r=2, target_modules=["q_proj"], modules_to_save=["model.norm"])
    with pytest.raises(InputError, match=r"not on 'model.norm'; merge the adapter"):
        read_adapter_weights(AdapterRef(2, "norm", saved_norm), model, llama_base, cfg)
    saved_head = lora(llama_base, seed=3, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(InputError, match=r"max_saved_module_bytes.*'lm_head'; merge the adapter"):
        read_adapter_weights(AdapterRef(3, "head", saved_head), model, llama_base, cfg)
