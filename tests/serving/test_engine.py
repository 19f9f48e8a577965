"""The engine core (`serving.engine.Engine`, driven in-process): continuous batching with adapter slots.

Greedy tokens of a request served in a mixed, changing batch must equal the same request alone, PEFT's
`generate` with its adapter, and plain transformers on the checkpoint `merge_streaming` writes for it.
"""

from __future__ import annotations

import random

import pytest
import torch

from merge.streaming import AdapterRef as MergeInput
from merge.streaming import merge_streaming
from serving.sampling import SamplingParams
from tests.serving.conftest import assert_greedy_agrees, make_engine, register, submit, tokens_of

PROMPTS = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [84, 104, 101, 32, 99, 97, 112, 105],
           [258, 117, 115, 101, 114, 10, 50, 43, 50, 61, 63, 257, 10, 258], [49, 50, 51]]


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def _hf_model(path, adapter=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()


def _hf_greedy(model, prompt: list[int], max_tokens: int, eos: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(prompt):].tolist()


def _logits_after(model, prompt: list[int]):
    def logits(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([prompt + prefix])).logits[0, -1]
    return logits


@pytest.mark.parametrize("base_name", ["llama_base", "gpt2_tied_base"])
def test_greedy_mixed_batch_equals_alone_peft_and_merged_checkpoint(base_name, request, lora, tmp_path):
    base = request.getfixturevalue(base_name)
    paths = [lora(base, seed=11), lora(base, seed=12, r=4), lora(base, seed=13, r=16, lora_alpha=8)]
    engine = make_engine(base, max_num_seqs=6, max_loras=2)  # rows and slots both run short: requests wait and rotate
    refs = register(engine, base, paths)
    cases = [(prompt, a, 5 + 3 * ((i + a) % 4)) for a in range(4) for i, prompt in enumerate(PROMPTS)]
    random.Random(0).shuffle(cases)

    mixed = [submit(engine, prompt, _greedy(n), [None, *refs][a]) for prompt, a, n in cases[:9]]
    for _ in range(3):
        engine.step()
    mixed += [submit(engine, prompt, _greedy(n), [None, *refs][a]) for prompt, a, n in cases[9:]]
    engine.run_until_idle()
    assert len(engine.running) == 0 and engine.metrics.requests.labels("length")._value.get() > 0
    alone = []
    for prompt, a, n in cases:
        alone.append(submit(engine, prompt, _greedy(n), [None, *refs][a]))
        engine.run_until_idle()

    eos = sorted(engine.eos_ids)
    peft = [_hf_model(base)] + [_hf_model(base, path) for path in paths]
    merged = [peft[0]]
    for i, path in enumerate(paths):
        out = merge_streaming(base, [MergeInput(path)], tmp_path / f"merged-{i}")
        merged.append(_hf_model(out.out_dir))
    for (prompt, a, n), got_mixed, got_alone in zip(cases, mixed, alone):
        label = f"adapter {a}, prompt {PROMPTS.index(prompt)}"
        reference = _hf_greedy(peft[a], prompt, n, eos)
        ref_logits = _logits_after(peft[a], prompt)
        assert got_mixed[-1].finish_reason in ("length", "stop")
        assert_greedy_agrees(tokens_of(got_mixed), tokens_of(got_alone), ref_logits, label + " mixed vs alone")
        assert_greedy_agrees(tokens_of(got_mixed), reference, ref_logits, label + " mixed vs PEFT")
        assert_greedy_agrees(_hf_greedy(merged[a], prompt, n, eos), reference, ref_logits, label + " merged vs PEFT")


def test_eviction_with_three_times_more_adapters_than_slots(llama_base, lora):
    paths = [lora(llama_base, seed=20 + i, r=4, target_modules=["q_proj", "v_proj", "down_proj"]) for i in range(6)]
    engine = make_engine(llama_base, max_num_seqs=4, max_loras=2, max_cpu_loras=3)
    refs = register(engine, llama_base, paths)
    cases = [(prompt, a) for a in range(6) for prompt in PROMPTS[:3]]
    random.Random(1).shuffle(cases)
    got = [submit(engine, prompt, _greedy(8), refs[a]) for prompt, a in cases[:10]]
    engine.run_until_idle()
    got += [submit(engine, prompt, _greedy(8), refs[a]) for prompt, a in cases[10:]]
    engine.run_until_idle()
    eos = sorted(engine.eos_ids)
    peft = [_hf_model(llama_base, path) for path in paths]
    for (prompt, a), deltas in zip(cases, got):
        assert_greedy_agrees(tokens_of(deltas), _hf_greedy(peft[a], prompt, 8, eos), _logits_after(peft[a], prompt),
                             f"adapter {a}")
    events = engine.metrics.adapter_events
    assert events.labels("evictions")._value.get() > 0 and events.labels("loads")._value.get() > 6
    assert engine.metrics.adapter_reads._value.get() > 6  # host copies dropped and read again from disk


def test_limits_on_rows_and_slots_hold_while_requests_wait(llama_base, lora):
    engine = make_engine(llama_base, max_num_seqs=3, max_loras=1)
    refs = register(engine, llama_base, [lora(llama_base, seed=1), lora(llama_base, seed=2)])
    for i in range(8):
        submit(engine, PROMPTS[i % 4], _greedy(4, ignore_eos=True), [None, *refs][i % 3])
    while engine.step():
        assert len(engine.running) <= 3
        assert len({s.adapter.id for s in engine.running if s.adapter}) <= 1
    assert not len(engine.waiting)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(llama_base, lora):
    engine = make_engine(llama_base)
    (ref,) = register(engine, llama_base, [lora(llama_base, seed=3)])
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = submit(engine, PROMPTS[0], params, ref)
    engine.run_until_idle()
    noise = [submit(engine, p, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), None) for p in PROMPTS]
    crowded = submit(engine, PROMPTS[0], params, ref)
    noise += [submit(engine, p, _greedy(6), ref) for p in PROMPTS]
    engine.run_until_idle()
    assert tokens_of(crowded) == tokens_of(alone)
    other = submit(engine, PROMPTS[0], SamplingParams(**{**params.__dict__, "seed": 99}), ref)
    engine.run_until_idle()
    assert tokens_of(other) != tokens_of(alone)
    assert all(d[-1].finish_reason == "length" for d in noise)


def test_stop_strings_are_trimmed_and_logprobs_reported(llama_base):
    engine = make_engine(llama_base)
    free = submit(engine, PROMPTS[1], _greedy(16, ignore_eos=True, logprobs=3))
    engine.run_until_idle()
    text = "".join(d.text for d in free)
    assert len(text) >= 4, "the tiny model wrote too little text for this test"
    for d in free:
        for entry in d.logprobs:
            assert entry.top[0][0] == entry.token and entry.top[0][1] == pytest.approx(entry.logprob)
            assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
    stop = text[2:4]
    stopped = submit(engine, PROMPTS[1], _greedy(16, ignore_eos=True, stop=(stop, "\u2603never")))
    engine.run_until_idle()
    assert "".join(d.text for d in stopped) == text[:text.index(stop)]
    assert stopped[-1].finish_reason == "stop"


def test_abort_frees_the_row_and_the_others_stay_right(llama_base, lora):
    engine = make_engine(llama_base)
    (ref,) = register(engine, llama_base, [lora(llama_base, seed=4)])
    alone = []
    for prompt in PROMPTS:
        alone.append(submit(engine, prompt, _greedy(10, ignore_eos=True), ref))
        engine.run_until_idle()
    got = [submit(engine, prompt, _greedy(10, ignore_eos=True), ref, request_id=f"x{i}")
           for i, prompt in enumerate(PROMPTS)]
    engine.step()
    engine.step()
    engine.abort("x1")
    engine.step()
    assert len(engine.running) == 3 and got[1][-1].finish_reason == "abort"
    engine.run_until_idle()
    peft = _hf_model(llama_base, lora(llama_base, seed=4))
    for i in (0, 2, 3):
        assert_greedy_agrees(tokens_of(got[i]), tokens_of(alone[i]), _logits_after(peft, PROMPTS[i]), f"prompt {i}")
