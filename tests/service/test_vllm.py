"""A real vLLM server (vLLM's CPU build, `loramill.vllm_env`) as the engine of a base model.

The control plane is configured for it as for any engine (`LORAMILL_ENGINE_URLS`, no embedded engine)
and the control plane's own end-to-end serving tests (`tests/service/test_inference.py`) run against
it unchanged: the base and a tenant's adapter by name, streaming, the openai SDK, another tenant's
model 404, bad requests 4xx, a job's fine-tuned adapter served the moment the job succeeds, a
deleted adapter 404. Two tenants' adapters are served side by side, one of them trained by
`loramill train` and uploaded as it was written.

Agreement: the same requests (prompt token ids, greedy, fp32) to vLLM and to loramill's engine
(in-process) give the same first 8 tokens for every request; the full-length agreement is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from loramill.vllm_env import server_command, server_environment
from tests.service.conftest import chat_lines
from tests.service.test_e2e import cli
from tests.service.test_inference import (  # noqa: F401 — the control plane's serving tests, run on vLLM here
    MAX_GENERATION_TOKENS, PROMPT, client, http, test_a_chat_that_omits_max_tokens_stops_at_the_operators_bound,
    test_a_jobs_adapter_is_served_when_the_job_succeeds_and_not_after_it_is_deleted,
    test_a_tenant_asks_its_adapter_and_the_base_by_name,
    test_another_tenants_model_is_unknown_and_bad_requests_are_4xx, upload)
from tests.serving.conftest import make_engine, register, submit, tokens_of
from tests.services import free_port, start_serve, stop, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test may build vLLM's environment
MAX_MODEL_LEN = 256
AGREE_PREFIX = 8  # greedy tokens that must agree on every request
AGREE_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, llama_base):
    """An adapter written by `loramill train` (all linear layers), used as it is on disk."""
    work = tmp_path_factory.mktemp("trained")
    (work / "train.jsonl").write_text(chat_lines(16))
    env = {**os.environ, "LORAMILL_DATA_DIR": str(work / "data")}
    done = subprocess.run([sys.executable, "-c", "from loramill.cli import main; main()", "train", "--base",
                           str(llama_base), "--data", str(work / "train.jsonl"), "--out", str(work / "adapter"),
                           "--epochs", "2", "--batch-size", "4", "--max-seq-len", "64", "--lr", "1e-2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return work / "adapter"


@pytest.fixture(scope="module")
def vllm_url(vllm_python, llama_base, tmp_path_factory):
    """vLLM serving the base as "tiny" (its registered name), 4 adapter slots of rank up to 16, fp32."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(server_command(vllm_python, llama_base, served_model_name="tiny", port=port,
                                                  max_loras=4, max_lora_rank=16, max_model_len=MAX_MODEL_LEN,
                                                  max_tokens=MAX_GENERATION_TOKENS),
                                   env=server_environment(dict(os.environ)), stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/health", process, timeout_s=900)
        except RuntimeError:
            print(log_path.read_text()[-5000:])
            raise
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process, timeout_s=60)


@pytest.fixture(scope="module")
def serve(tmp_path_factory, llama_base, vllm_url):
    """`loramill serve` (SQLite, its own worker) with base "tiny" served by the vLLM server; tenants alice, bob."""
    data = tmp_path_factory.mktemp("serve-vllm") / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env.update({"LORAMILL_DATA_DIR": str(data), "LORAMILL_ENGINE_URLS": f'{{"tiny": "{vllm_url}"}}',
                "LORAMILL_EMBEDDED_ENGINES": "false", "LORAMILL_MAX_GENERATION_TOKENS": str(MAX_GENERATION_TOKENS)})
    keys = {name: cli(env, "tenant", "create", name) for name in ("alice", "bob")}
    cli(env, "model", "add", "tiny", str(llama_base))
    process, url = start_serve(env, data / "serve.log")
    yield {"url": url, "keys": keys, "process": process, "data": data}
    stop(process)


def test_two_tenants_adapters_side_by_side_one_trained_by_loramill(serve, vllm_url, llama_base, lora,
                                                                   trained_adapter):
    alice_id = upload(serve, lora(llama_base, seed=21), "alice")
    bob_id = upload(serve, trained_adapter, "bob")  # `loramill train`'s output, unchanged
    alice, bob = client(serve, "alice"), client(serve, "bob")
    messages = [{"role": "user", "content": "What is 3 plus one?"}]
    answers = {}
    for name, tenant, model in (("alice", alice, alice_id), ("bob", bob, bob_id)):
        answer = tenant.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        assert answer.model == model and answer.usage.completion_tokens >= 1
        answers[name] = answer.choices[0].message.content
    base = alice.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert len({answers["alice"], answers["bob"], base.choices[0].message.content}) == 3
    for tenant, other in ((alice, bob_id), (bob, alice_id)):
        with pytest.raises(openai.NotFoundError) as refused:
            tenant.chat.completions.create(model=other, messages=messages, max_tokens=4)
        assert refused.value.body["code"] == "model_not_found"
    assert {"tiny", alice_id, bob_id} <= _vllm_models(vllm_url)  # vLLM holds both tenants' adapters, by id

    # vLLM forgot an adapter (it restarted): the control plane loads it again and answers
    assert httpx.post(f"{vllm_url}/v1/unload_lora_adapter", json={"lora_name": bob_id}).status_code == 200
    again = bob.chat.completions.create(model=bob_id, messages=messages, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == answers["bob"] and bob_id in _vllm_models(vllm_url)

    # deleting an adapter unloads it from vLLM (after the answer)
    assert http(serve, "alice").delete(f"/v1/adapters/{alice_id}").json()["deleted"] is True
    deadline = time.monotonic() + 30
    while alice_id in _vllm_models(vllm_url):
        assert time.monotonic() < deadline, "the deleted adapter is still loaded in vLLM"
        time.sleep(0.2)


def _vllm_models(url: str) -> set[str]:
    return {card["id"] for card in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


def test_engine_errors_reach_the_caller_in_openais_shape(serve, llama_base, lora):
    """vLLM's own refusals come back as OpenAI errors (OpenAI's type, a string code or null), with no path: a
    prompt longer than its context, and an adapter of a rank above its --max-lora-rank (vLLM: 500 from its
    worker; the adapter's fault, so 400, as loramill's engine answers)."""
    too_long = http(serve).post("/v1/completions", json={"model": "tiny", "prompt": "x" * (MAX_MODEL_LEN + 10),
                                                          "max_tokens": 8})
    wide_id = upload(serve, lora(llama_base, seed=41, r=32, lora_alpha=32))
    too_wide = http(serve).post("/v1/completions", json={"model": wide_id, "prompt": PROMPT, "max_tokens": 4})
    for response, words in ((too_long, "maximum context length"), (too_wide, "max_lora_rank")):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["code"] is None or isinstance(error["code"], str)
        assert words in error["message"] and str(serve["data"]) not in error["message"]


def _vllm_greedy(url: str, model: str, prompt: list[int], n: int) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_greedy_tokens_agree_with_loramills_engine(vllm_url, llama_base, lora, trained_adapter):
    """Same prompts, same adapters, fp32, greedy: vLLM and loramill's engine agree on the first 8 tokens of
    every request; how far they agree over 32 tokens is printed (near-ties may flip later tokens: the two
    engines add the LoRA deltas in a different order)."""
    from transformers import AutoTokenizer

    adapters = {"agree-a": lora(llama_base, seed=31), "agree-b": lora(llama_base, seed=32, r=16, lora_alpha=32),
                "agree-trained": trained_adapter}
    for name, path in adapters.items():
        loaded = httpx.post(f"{vllm_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                            timeout=120)
        assert loaded.status_code == 200, loaded.text
    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    texts = ["Hello world, this is", "The capital of France", "1 2 3 4", "def main():", "<|im_start|>user\nHi",
             "Once upon a time"]
    prompts = [tokenizer.encode(t) for t in texts]

    engine = make_engine(llama_base, max_lora_rank=16, max_model_len=MAX_MODEL_LEN)
    refs = dict(zip(adapters, register(engine, llama_base, list(adapters.values()))))
    from serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=AGREE_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [(model, prompt) for model in ("tiny", *adapters) for prompt in prompts]
    runs = [submit(engine, prompt, params, refs.get(model)) for model, prompt in requests]
    engine.run_until_idle()
    ours = [tokens_of(deltas) for deltas in runs]
    theirs = [_vllm_greedy(vllm_url, model, prompt, AGREE_NEW_TOKENS) for model, prompt in requests]

    agreed = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
              for x, y in zip(ours, theirs)]
    whole = sum(a == AGREE_NEW_TOKENS for a in agreed)
    print(f"\nvLLM vs loramill engine, greedy fp32, {len(requests)} requests x {AGREE_NEW_TOKENS} tokens: "
          f"{whole}/{len(requests)} agree over the full length; {sum(agreed)}/{len(requests) * AGREE_NEW_TOKENS} "
          f"tokens before the first difference; shortest agreeing prefix {min(agreed)}")
    for (model, prompt), count in zip(requests, agreed):
        assert count >= AGREE_PREFIX, f"{model} on {tokenizer.decode(prompt)!r}: tokens differ at {count}"
