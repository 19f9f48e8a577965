"""Serving through the control plane: `loramill serve` with its embedded engine, driven by the `openai` SDK.

A tenant asks a base model, an uploaded adapter and a job's fine-tuned model by name; another
tenant's model is 404 like an unknown one; answers and streams carry the name the caller used and
equal what PEFT generates; a job's adapter is served the moment the job succeeds; a deleted
adapter answers 404; a killed engine answers 503 without hanging and is started again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import psutil
import pytest
import torch

from tests.service.conftest import chat_lines
from tests.service.test_e2e import cli
from tests.services import start_serve, stop

pytestmark = pytest.mark.slow
PROMPT = "Hello world, this is"
MAX_GENERATION_TOKENS = 48  # not the test bases' generation_config max_new_tokens (64): vLLM must not take that


@pytest.fixture(scope="module")
def serve(tmp_path_factory, llama_base):
    data = tmp_path_factory.mktemp("serve") / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env.update({"LORAMILL_DATA_DIR": str(data), "LORAMILL_ENGINE_MAX_MODEL_LEN": "256",
                "LORAMILL_ENGINE_DTYPE": "float32", "LORAMILL_ENGINE_DEVICE": "cpu",
                "LORAMILL_MAX_GENERATION_TOKENS": str(MAX_GENERATION_TOKENS)})
    keys = {name: cli(env, "tenant", "create", name) for name in ("alice", "bob")}
    cli(env, "model", "add", "tiny", str(llama_base))
    process, url = start_serve(env, data / "serve.log")
    yield {"url": url, "keys": keys, "process": process, "data": data}
    stop(process)


def client(serve, tenant: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve['url']}/v1", api_key=serve["keys"][tenant], max_retries=0, timeout=120)


def http(serve, tenant: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=serve["url"], headers={"Authorization": f"Bearer {serve['keys'][tenant]}"},
                        timeout=120)


def upload(serve, adapter_dir, tenant: str = "alice") -> str:
    files = [("file", (name, (adapter_dir / name).read_bytes())) for name in
             ("adapter_config.json", "adapter_model.safetensors")]
    response = http(serve, tenant).post("/v1/adapters", data={"base_model": "tiny"}, files=files)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def peft_greedy(base, adapter_dir, prompt: str, n: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # as OpenAI and vLLM answer


def test_a_tenant_asks_its_adapter_and_the_base_by_name(serve, llama_base, lora):
    adapter = lora(llama_base, seed=7)
    adapter_id = upload(serve, adapter)
    alice = client(serve)
    assert {"tiny", adapter_id} <= {m.id for m in alice.models.list()}
    tuned = alice.completions.create(model=adapter_id, prompt=PROMPT, max_tokens=12, temperature=0)
    assert tuned.model == adapter_id and tuned.usage.completion_tokens == 12
    assert tuned.choices[0].text == peft_greedy(llama_base, adapter, PROMPT, 12)
    base = alice.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert base.model == "tiny" and base.choices[0].text == peft_greedy(llama_base, None, PROMPT, 12)
    assert base.choices[0].text != tuned.choices[0].text

    stream = alice.chat.completions.create(model=adapter_id, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.model == adapter_id for c in chunks) and chunks[-1].usage.completion_tokens == 8
    whole = alice.chat.completions.create(model=adapter_id, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content

    async def concurrently() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{serve['url']}/v1", api_key=serve["keys"]["alice"], max_retries=0)
        answers = await asyncio.gather(*(aclient.completions.create(model=m, prompt=PROMPT, max_tokens=12,
                                                                     temperature=0)
                                         for m in (adapter_id, "tiny", adapter_id)))
        return [a.choices[0].text for a in answers]

    assert asyncio.run(concurrently()) == [tuned.choices[0].text, base.choices[0].text, tuned.choices[0].text]


def test_another_tenants_model_is_unknown_and_bad_requests_are_4xx(serve, llama_base, lora):
    adapter_id = upload(serve, lora(llama_base, seed=8))
    for model in (adapter_id, "ft:tiny:alice::ftjob-x", "nope"):
        with pytest.raises(openai.NotFoundError) as refused:
            client(serve, "bob").completions.create(model=model, prompt=PROMPT, max_tokens=4)
        assert refused.value.body["code"] == "model_not_found"
    bad = [({"max_tokens": MAX_GENERATION_TOKENS + 1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
           ({"n": 2}, "n"), ({"prompt": ""}, "prompt"), ({"prompt": "x" * 4000, "max_tokens": 8}, None)]
    for extra, param in bad:
        body = {"model": adapter_id, "prompt": PROMPT, "max_tokens": 4, **extra}
        response = http(serve).post("/v1/completions", json=body)
        assert 400 <= response.status_code < 500, (extra, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and (param is None or error["param"] == param)
        assert str(serve["data"]) not in error["message"]
    assert client(serve).completions.create(model=adapter_id, prompt=PROMPT, max_tokens=4).usage  # still serving


def test_a_chat_that_omits_max_tokens_stops_at_the_operators_bound(serve):
    """OpenAI's chat runs an omitted max_tokens to the end of the context (256 here); the operator's
    LORAMILL_MAX_GENERATION_TOKENS bounds it as it bounds an explicit one, on either engine (vLLM would
    otherwise take the checkpoint's generation_config `max_new_tokens`, 64, or run to the end)."""
    answer = client(serve).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                   extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == MAX_GENERATION_TOKENS and answer.choices[0].finish_reason == "length"


def test_a_jobs_adapter_is_served_when_the_job_succeeds_and_not_after_it_is_deleted(serve):
    api = http(serve)
    file_id = api.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"file": ("t.jsonl", chat_lines(8).encode())}).json()["id"]
    job_id = api.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, "hyperparameters": {
        "n_epochs": 1, "batch_size": 4, "max_seq_len": 64}}).json()["id"]
    deadline = time.monotonic() + 300
    while (job := api.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert job["status"] == "succeeded", job["error"]
    answer = client(serve).chat.completions.create(model=job["fine_tuned_model"], max_tokens=4,
                                                   messages=[{"role": "user", "content": "What is 1 plus one?"}])
    assert answer.model == job["fine_tuned_model"] and answer.usage.completion_tokens >= 1
    assert api.delete(f"/v1/adapters/{job['adapter_id']}").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        client(serve).chat.completions.create(model=job["fine_tuned_model"], max_tokens=4,
                                              messages=[{"role": "user", "content": "Hi"}])


def test_a_killed_engine_answers_503_at_once_and_is_started_again(serve):
    alice = client(serve)
    alice.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    engines = [p for p in psutil.Process(serve["process"].pid).children(recursive=True)
               if "engine" in " ".join(p.cmdline())]
    assert len(engines) == 1
    os.kill(engines[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engines[0].is_running() and engines[0].status() != psutil.STATUS_ZOMBIE:  # serve reaps it later
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        alice.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert refused.value.status_code == 503 and time.monotonic() - started < 10
    answer = alice.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 2  # ignore_eos: sampled, an end-of-text could come first
