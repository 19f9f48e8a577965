"""Two `loramill engine` processes behind one `loramill serve`: adapter affinity, failover, drain.

Requests for an adapter all land on the engine rendezvous hashing picks (each engine's
`/v1/models` says which adapters it loaded); killed by PID, that engine is routed around and the
next request is answered by the other, which loads the adapter on demand, within 5 s; a drained
engine finishes a running stream and gets no new request until resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from service.routing import rendezvous_order
from tests.service.test_e2e import cli
from tests.service.test_inference import PROMPT, upload
from tests.services import start_serve, stop

pytestmark = pytest.mark.slow
PROBE_S = 0.5


def start_engine(base, port: int = 0) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-c", "from loramill.cli import main; main()", "engine", "--base", str(base),
           "--served-model-name", "tiny", "--port", str(port), "--max-loras", "4", "--max-lora-rank", "8",
           "--max-num-seqs", "4", "--max-model-len", "128", "--dtype", "float32", "--device", "cpu",
           "--threads", "1"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    assert line.startswith("loramill engine ready on http://"), line
    return process, line.split()[4]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, llama_base):
    data = tmp_path_factory.mktemp("fleet") / "data"
    engines = [start_engine(llama_base) for _ in range(2)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env.update({"LORAMILL_DATA_DIR": str(data), "LORAMILL_EMBEDDED_ENGINES": "false",
                "LORAMILL_ENGINE_URLS": json.dumps({"tiny": [url for _, url in engines]}),
                "LORAMILL_ENGINE_PROBE_INTERVAL_S": str(PROBE_S), "LORAMILL_MAX_GENERATION_TOKENS": "64"})
    keys = {"alice": cli(env, "tenant", "create", "alice")}
    cli(env, "model", "add", "tiny", str(llama_base))
    serve, url = start_serve(env, data / "serve.log")
    fleet = {"url": url, "keys": keys, "env": env,
             "engines": {url: process for process, url in engines}}
    yield fleet
    stop(serve)
    for process in fleet["engines"].values():
        stop(process)


def holders(fleet, adapter_id: str) -> list[str]:
    """The engines whose /v1/models lists the adapter (alive ones only)."""
    found = []
    for url, process in fleet["engines"].items():
        if process.poll() is None:
            models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
            found += [url] if adapter_id in {m["id"] for m in models} else []
    return found


def requests_finished(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("loramill_engine_requests_finished_total"))


def ask(alice: openai.OpenAI, adapter_id: str) -> int:
    """Two tokens from the adapter (`ignore_eos`: a sampled end-of-text would cut the answer short); the count."""
    answer = alice.completions.create(model=adapter_id, prompt=PROMPT, max_tokens=2, extra_body={"ignore_eos": True})
    return answer.usage.completion_tokens


def client(fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet['url']}/v1", api_key=fleet["keys"]["alice"], max_retries=0, timeout=60)


def test_an_adapters_requests_all_go_to_the_engine_rendezvous_hashing_picks(fleet, llama_base, lora):
    ids = [upload(fleet, lora(llama_base, seed=40 + i, r=8)) for i in range(4)]
    alice = client(fleet)
    for _ in range(3):
        for adapter_id in ids:
            assert ask(alice, adapter_id) == 2
    for adapter_id in ids:
        assert holders(fleet, adapter_id) == [rendezvous_order(adapter_id, list(fleet["engines"]))[0]]


def test_a_drained_engine_finishes_its_stream_and_gets_no_new_request(fleet, llama_base, lora):
    alice = client(fleet)
    adapter_id = upload(fleet, lora(llama_base, seed=60, r=8))
    ask(alice, adapter_id)
    (holder,) = holders(fleet, adapter_id)
    stream = alice.completions.create(model=adapter_id, prompt=PROMPT, max_tokens=48, stream=True,
                                      extra_body={"ignore_eos": True})
    first = next(iter(stream))
    cli(fleet["env"], "engines", "drain", holder)
    time.sleep(3 * PROBE_S)
    rest = list(stream)
    assert first.choices and [c for c in rest if c.choices][-1].choices[0].finish_reason == "length"  # ran to the end
    finished = requests_finished(holder)
    for _ in range(3):
        assert ask(alice, adapter_id) == 2
    assert requests_finished(holder) == finished  # no new request reached it
    assert sorted(holders(fleet, adapter_id)) == sorted(fleet["engines"])  # loaded on the other on demand
    listed = cli(fleet["env"], "engines", "list")
    assert f"tiny  {holder}  drained" in listed
    assert f'loramill_engine_drained{{base="tiny",url="{holder}"}} 1.0' in httpx.get(f"{fleet['url']}/metrics").text
    cli(fleet["env"], "engines", "resume", holder)
    time.sleep(3 * PROBE_S)
    ask(alice, adapter_id)
    assert requests_finished(holder) == finished + 1  # back to the engine that holds the adapter


def test_a_killed_engines_adapter_is_answered_by_the_other_within_5_s(fleet, llama_base, lora):
    adapter_id = upload(fleet, lora(llama_base, seed=50, r=8))
    alice = client(fleet)
    for _ in range(3):
        ask(alice, adapter_id)
    (holder,) = holders(fleet, adapter_id)
    process = fleet["engines"][holder]
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    started = time.monotonic()
    assert ask(alice, adapter_id) == 2 and time.monotonic() - started < 5  # the bound, not a speed
    (other,) = [url for url in fleet["engines"] if url != holder]
    assert holders(fleet, adapter_id) == [other]
    metrics = httpx.get(f"{fleet['url']}/metrics", timeout=10).text
    assert f'loramill_engine_up{{base="tiny",url="{holder}"}} 0.0' in metrics
    assert f'loramill_engine_up{{base="tiny",url="{other}"}} 1.0' in metrics
    for _ in range(3):  # and stays there
        assert ask(alice, adapter_id) == 2


def test_a_restarted_engine_is_probed_back_and_takes_its_adapters_again(fleet, llama_base, lora):
    """Runs after the kill test: the dead engine comes back on its port; the /health probe returns it to the route."""
    (dead,) = [url for url, process in fleet["engines"].items() if process.poll() is not None]
    adapter_id = next(a for a in (upload(fleet, lora(llama_base, seed=70 + i, r=8)) for i in range(16))
                      if rendezvous_order(a, list(fleet["engines"]))[0] == dead)
    alice = client(fleet)
    ask(alice, adapter_id)  # served by the live engine meanwhile
    assert holders(fleet, adapter_id) != [dead]
    process, url = start_engine(llama_base, port=int(dead.rsplit(":", 1)[1]))
    assert url == dead
    fleet["engines"][dead] = process
    time.sleep(3 * PROBE_S)
    ask(alice, adapter_id)
    assert dead in holders(fleet, adapter_id)  # loaded there on demand, its first choice again
