"""Issue 9's hostile requests, all at once, against one API process, beside honest traffic.

    python bench/hostile.py [--rate 20] [--settle 3]

Starts one `loramill serve` (a subprocess over a fresh data directory, SQLite, the embedded
broker and worker), with a tenant, a tiny base model and one small dataset, then sends, at the
same time:
- **honest traffic**: `GET /v1/models` and `GET /v1/files` with a valid key, open-loop at `--rate`
  requests/s (request i leaves at t0 + i/rate, whatever the earlier ones are doing);
- **the hostile cases**, each from its own thread: a ReDoS `rank_pattern` adapter, a 50 MB
  single-line dataset and a job on it, 300 MB JSON bodies without a key and with a wrong one, a
  100 MB request header, a 55 MB safetensors header, malformed adapters (bad offsets, dtypes,
  shapes, nesting, NaN ranks, non-UTF-8, invalid regexes), bad job and merge parameters, a JSON
  body past the limit, and bad `Range` headers.

Prints the honest requests' p50/p99 latency, the API process's peak RSS growth over its RSS
before the hostile phase (psutil, sampled every 20 ms), the count of 5xx answers (honest and
hostile), the hostile requests that were accepted, and what was stored for them: rows (files,
adapters, jobs, merges) and artifact files, before against after. Targets (issue 9): honest
p99 < 100 ms, RSS growth < 150 MB, zero 5xx, nothing stored.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procs import free_port, stop, wait_http  # noqa: E402

CLI = [sys.executable, "-c", "from loramill.cli import main; main()"]


def cli(env: dict, *args: str) -> str:
    out = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"loramill {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def make_adapter(base: Path, out: Path) -> Path:
    """A real PEFT LoRA adapter (rank 4 on q_proj/v_proj) for `base`: what the malformed ones are made from."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


# -- what a hostile client sends


def safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def redos_adapter(config: dict) -> tuple[bytes, bytes]:
    """`rank_pattern: {"(a+)+": 4}` and a module named 28 `a`s and a `!`: exponential in a backtracking regex."""
    config = {**config, "r": 8, "rank_pattern": {"(a+)+": 4}}
    header, offset = {}, 0
    for name, rank in (("a" * 28, 4), ("a" * 28 + "!", 2)):
        for part, shape in (("lora_A", [rank, 8]), ("lora_B", [8, rank])):
            header[f"base_model.model.{name}.{part}.weight"] = {"dtype": "F32", "shape": shape,
                                                               "data_offsets": [offset, offset + 32 * rank]}
            offset += 32 * rank
    return json.dumps(config).encode(), safetensors(header, b"\0" * offset)


def bad_weights(weights: bytes, case: str) -> bytes:
    """The real adapter's safetensors file with one thing broken."""
    n = int.from_bytes(weights[:8], "little")
    header, body = json.loads(weights[8:8 + n]), weights[8 + n:]
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = header[names[0]], header[names[1]]
    if case == "string data_offsets":
        first["data_offsets"] = [str(x) for x in first["data_offsets"]]
    elif case == "shape 1e999":
        return safetensors(json.dumps(header).replace(json.dumps(first["shape"]), "[1e999, 1]", 1).encode(), body)
    elif case == "dtype in a list":
        first["dtype"] = [first["dtype"]]
    elif case.startswith("nested"):  # "nested 100,000 deep"
        depth = int(case.split()[1].replace(",", ""))
        return safetensors(b'{"x": ' + b"[" * depth + b"]" * depth + b"}")
    elif case == "overlapping offsets":  # header bytes would have been read as weights
        second["data_offsets"] = [second["data_offsets"][0] - 8, second["data_offsets"][1] - 8]
    elif case == "negative offsets":
        second["data_offsets"] = [-8, second["data_offsets"][1] - second["data_offsets"][0] - 8]
    return safetensors(header, body)


BAD_WEIGHTS = ("string data_offsets", "shape 1e999", "dtype in a list", "nested 100,000 deep", "overlapping offsets",
               "negative offsets")
BAD_CONFIGS: dict[str, Callable[[bytes], bytes]] = {
    "r NaN": lambda raw: raw.replace(b'"r": 4', b'"r": NaN'),
    "r 4.5": lambda raw: raw.replace(b'"r": 4', b'"r": 4.5'),
    "lora_alpha 1e308": lambda raw: raw.replace(b'"lora_alpha": 8', b'"lora_alpha": 1e308'),
    "target_modules 5": lambda raw: json.dumps({**json.loads(raw), "target_modules": 5}).encode(),
    "non-UTF-8 config": lambda raw: raw[:-1] + b', "x": "\xff\xfe"}',
    "config nested 100,000 deep": lambda raw: b'{"r": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "invalid regex": lambda raw: json.dumps({**json.loads(raw), "rank_pattern": {"q_proj[": 8}}).encode(),
}


def zeros(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = b"0" * chunk
    for _ in range(total // chunk):
        yield block


def raw_status(port: int, head: bytes, body: Iterator[bytes] = iter(())) -> int:
    """Send a request head and body chunks (until the server stops reading); the answer's status (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(head)
            for chunk in body:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed without reading the rest
        data = b""
        try:
            while b"\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


class Bench:
    """The hostile cases, each a method run in its own thread; every body is built beforehand (`__init__`), so
    building one never holds this process's GIL while the others send."""

    def __init__(self, url: str, port: int, key: str, adapter: Path, file_id: str):
        self.url, self.port, self.key, self.file_id = url, port, key, file_id
        self.auth = {"Authorization": f"Bearer {key}"}
        self.results: list[tuple[str, int, float]] = []  # (case, status, seconds)
        self._lock = threading.Lock()
        config, weights = (adapter / "adapter_config.json").read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()
        entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        header = json.dumps({f"base_model.model.layers.{i}.lora_A.weight": entry for i in range(550_000)}).encode()
        raw = json.dumps(json.loads(config)).encode()
        self.adapters = {
            "ReDoS rank_pattern adapter": self._adapter_request(*redos_adapter(json.loads(config))),
            f"{len(header) / 1e6:.0f} MB safetensors header": self._adapter_request(config, safetensors(header)),
            **{f"safetensors: {case}": self._adapter_request(config, bad_weights(weights, case)) for case in BAD_WEIGHTS},
            **{f"config: {case}": self._adapter_request(change(raw), weights) for case, change in BAD_CONFIGS.items()},
        }
        line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "' + \
            b"a" * (50 << 20) + b'"}]}\n'
        self.long_line = self._prepared("POST", "/v1/files", data={"purpose": "fine-tune"},
                                        files={"file": ("long.jsonl", line)})

    def _prepared(self, method: str, path: str, **kwargs) -> httpx.Request:
        request = httpx.Request(method, f"{self.url}{path}", headers={**self.auth, **kwargs.pop("headers", {})}, **kwargs)
        request.read()  # encoded now, not while it is sent
        return request

    def _adapter_request(self, config: bytes, weights: bytes) -> httpx.Request:
        return self._prepared("POST", "/v1/adapters", data={"base_model": "tiny"}, files=[
            ("file", ("adapter_config.json", config, "application/json")),
            ("file", ("adapter_model.safetensors", weights, "application/octet-stream"))])

    def record(self, case: str, status: int, started: float) -> None:
        with self._lock:
            self.results.append((case, status, time.perf_counter() - started))

    def send(self, client: httpx.Client, case: str, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        response = client.send(request)
        self.record(case, response.status_code, started)
        return response

    def json(self, client: httpx.Client, case: str, path: str, body: bytes | dict) -> None:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send(client, case, self._prepared("POST", path, content=content, headers={"Content-Type": "application/json"}))

    # each of these runs in its own thread

    def redos_and_huge_header(self, client: httpx.Client) -> None:
        for case, request in list(self.adapters.items())[:2]:
            self.send(client, case, request)

    def malformed_adapters(self, client: httpx.Client) -> None:
        for case, request in list(self.adapters.items())[2:]:
            self.send(client, case, request)

    def long_dataset_line(self, client: httpx.Client) -> None:
        response = self.send(client, "50 MB single-line dataset", self.long_line)
        file_id = response.json()["id"] if response.status_code == 200 else "file-refused"
        self.json(client, "job on the 50 MB line", "/v1/fine_tuning/jobs", {"model": "tiny", "training_file": file_id})

    def unauthenticated_bodies(self, _client: httpx.Client) -> None:
        for case, authorization in (("no key", b""), ("wrong key", b"Authorization: Bearer wrong-key\r\n")):
            head = (b"POST /v1/merges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + authorization
                    + b"Content-Length: 314572800\r\n\r\n")
            started = time.perf_counter()
            self.record(f"300 MB JSON body, {case}", raw_status(self.port, head, zeros(300 << 20)), started)

    def huge_header(self, _client: httpx.Client) -> None:
        started = time.perf_counter()
        status = raw_status(self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", zeros(100 << 20))
        self.record("100 MB request header", status, started)

    def json_past_the_limit(self, _client: httpx.Client) -> None:
        auth = f"Authorization: Bearer {self.key}\r\n".encode()
        head = (b"POST /v1/merges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
                + b"Transfer-Encoding: chunked\r\n\r\n")
        started = time.perf_counter()
        chunks = (b"100000\r\n" + c + b"\r\n" for c in zeros(100 << 20))
        self.record("100 MB chunked JSON body with a key", raw_status(self.port, head, chunks), started)

    def bad_parameters(self, client: httpx.Client) -> None:
        job = {"model": "tiny", "training_file": self.file_id}
        cases = {
            "lora.alpha 1e308": {**job, "lora": {"alpha": 1e308}},
            "max_seq_len 131072": {**job, "hyperparameters": {"max_seq_len": 131072}},
            "1 MB metadata key": {**job, "metadata": {"k" * (1 << 20): "v"}},
            "n_epochs 0": {**job, "hyperparameters": {"n_epochs": 0}},
            "target_modules []": {**job, "lora": {"target_modules": []}},
            "NUL in model": {**job, "model": "tiny\x00"},
        }
        for case, body in cases.items():
            self.json(client, f"job: {case}", "/v1/fine_tuning/jobs", body)
        self.json(client, "job: lora.alpha Infinity", "/v1/fine_tuning/jobs",
                  json.dumps(job)[:-1].encode() + b', "lora": {"alpha": Infinity}}')
        merge = {"base_model": "tiny", "adapters": [{"adapter": "adapter-none"}]}
        self.json(client, "merge: weight NaN", "/v1/merges", b'{"base_model": "tiny", "adapters": '
                  b'[{"adapter": "adapter-none", "weight": NaN}]}')
        self.json(client, "merge: density with linear", "/v1/merges", {**merge, "method": "linear", "density": 0.5})
        self.json(client, "merge: max_shard_size 0B", "/v1/merges", {**merge, "max_shard_size": "0B"})

    def bad_ranges(self, client: httpx.Client) -> None:
        for value in ("bytes=abc", "items=0-1", "bytes=100-50", "bytes=", "bytes=999999999-", "bytes=-0"):
            started = time.perf_counter()
            response = client.get(f"{self.url}/v1/files/{self.file_id}/content", headers={**self.auth, "Range": value})
            self.record(f"Range: {value}", response.status_code, started)


HOSTILE = ("redos_and_huge_header", "malformed_adapters", "long_dataset_line", "unauthenticated_bodies", "huge_header",
           "json_past_the_limit", "bad_parameters", "bad_ranges")
ACCEPTED_ON_PURPOSE = ("Range: ",)  # an invalid Range is ignored (200, the whole file), as RFC 9110 allows


def honest_traffic(url: str, key: str, rate: float, until, results) -> None:
    """In its own process (so the hostile senders' work never delays it): GET /v1/models and /v1/files,
    alternately, open-loop at `rate`/s from a few threads, until `until` is set; puts [(sent at, status, seconds)]."""
    paths = ("/v1/models", "/v1/files")
    t0, sent, out = time.perf_counter(), [0], []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            while not until.is_set():
                with lock:
                    i = sent[0]
                    sent[0] += 1
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent_at, started = time.time(), time.perf_counter()
                try:
                    status = client.get(f"{url}{paths[i % 2]}").status_code
                except httpx.TransportError:
                    status = 0
                out.append((sent_at, status, time.perf_counter() - started))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(out)


def percentile(sorted_seconds: list[float], p: float) -> float:
    """The p-th percentile in milliseconds (nearest rank)."""
    return sorted_seconds[min(len(sorted_seconds) - 1, int(len(sorted_seconds) * p / 100))] * 1e3


def sample_rss(process: psutil.Process, until: threading.Event, out: list) -> None:
    while not until.is_set():
        out.append(process.memory_info().rss)
        time.sleep(0.02)


def stored(data_dir: Path) -> dict[str, int]:
    """Rows a tenant's request can create, and artifact files (outside the trash), by kind."""
    from sqlalchemy import func, select

    from jobs.db import database
    from jobs.tables import AdapterRow, FileRow, JobRow, MergeRow
    from loramill.settings import Settings

    db = database(Settings(data_dir=data_dir).resolved_database_url)
    with db.sessions() as session:
        counts = {table.__tablename__: session.scalar(select(func.count()).select_from(table))
                  for table in (FileRow, AdapterRow, JobRow, MergeRow)}
    root = data_dir / "artifacts"
    counts["artifact files"] = sum(1 for p in root.rglob("*") if p.is_file() and ".trash" not in p.parts)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="honest requests per second")
    parser.add_argument("--settle", type=float, default=3.0, help="honest traffic alone before and after, seconds")
    parser.add_argument("--rounds", type=int, default=3, help="times the hostile set is sent (each all at once)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loramill-hostile-") as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
        env.update({"LORAMILL_DATA_DIR": str(tmp / "data"), "LORAMILL_ADMIN_KEY": "bench-admin-key"})
        cli(env, "base", "create", str(tmp / "base"))
        key = cli(env, "tenant", "create", "alice")
        cli(env, "model", "add", "tiny", str(tmp / "base"))
        adapter = make_adapter(tmp / "base", tmp / "adapter")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_http(f"{url}/readyz", server, timeout_s=180)
            dataset = "".join(json.dumps({"messages": [{"role": "user", "content": f"{i} plus one?"},
                                                       {"role": "assistant", "content": f"{i + 1}."}]}) + "\n"
                              for i in range(8))
            upload = httpx.post(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"},
                                data={"purpose": "fine-tune"}, files={"file": ("honest.jsonl", dataset.encode())})
            upload.raise_for_status()
            bench = Bench(url, port, key, adapter, upload.json()["id"])
            api = psutil.Process(server.pid)
            before = stored(tmp / "data")

            spawn = multiprocessing.get_context("spawn")
            done, queue, rss, sampling = spawn.Event(), spawn.Queue(), [], threading.Event()
            traffic = spawn.Process(target=honest_traffic, args=(url, key, args.rate, done, queue))
            sampler = threading.Thread(target=sample_rss, args=(api, sampling, rss))
            traffic.start()
            time.sleep(args.settle)
            rss_before = api.memory_info().rss
            sampler.start()
            hostile_from = time.time()
            clients = [httpx.Client(timeout=300) for _ in HOSTILE]
            for _ in range(args.rounds):
                threads = [threading.Thread(target=getattr(bench, name), args=(client,))
                           for name, client in zip(HOSTILE, clients)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            hostile_to = time.time()
            time.sleep(args.settle)
            done.set()
            honest = queue.get(timeout=120)
            traffic.join()
            sampling.set()
            sampler.join()
            for client in clients:
                client.close()
            after = stored(tmp / "data")
        finally:
            stop(server)

    during = sorted(seconds for at, _, seconds in honest if hostile_from <= at <= hostile_to)
    alone = sorted(seconds for at, _, seconds in honest if not hostile_from <= at <= hostile_to)
    print(f"{'hostile case':<44} {'status':>6} {'seconds':>8}  (slowest of {args.rounds} rounds)")
    slowest: dict[str, tuple[int, float]] = {}
    for case, status, seconds in bench.results:
        if case not in slowest or seconds > slowest[case][1] or status != slowest[case][0]:
            slowest[case] = (status, max(seconds, slowest.get(case, (0, 0.0))[1]))
    for case, (status, seconds) in sorted(slowest.items()):
        print(f"{case:<44} {status:>6} {seconds:>8.2f}")
    statuses = [status for _, status, _ in honest]
    server_errors = sum(1 for _, status, _ in bench.results if status >= 500) + sum(1 for s in statuses if s >= 500)
    accepted = [case for case, status, _ in bench.results
                if 200 <= status < 300 and not case.startswith(ACCEPTED_ON_PURPOSE)]
    unanswered = [case for case, status, _ in bench.results if status == 0] + [f"honest #{i}" for i, s in
                                                                               enumerate(statuses) if s == 0]
    grown = {kind: after[kind] - before[kind] for kind in before if after[kind] != before[kind]}
    print(f"\nhostile phase: {len(bench.results)} requests ({args.rounds} rounds of {len(bench.results) // args.rounds}) "
          f"in {hostile_to - hostile_from:.1f} s; honest requests at {args.rate:g}/s: {len(during)} during it, "
          f"{len(alone)} alone ({args.settle:g} s before and after)")
    print(f"honest latency during: p50 {percentile(during, 50):.1f} ms, p99 {percentile(during, 99):.1f} ms, max "
          f"{during[-1] * 1e3:.1f} ms (target p99 < 100 ms); alone, same run: p50 {percentile(alone, 50):.1f} ms, "
          f"p99 {percentile(alone, 99):.1f} ms; honest answers not 200: {sum(1 for s in statuses if s != 200)}")
    print(f"API RSS: {rss_before / 2**20:.0f} MB before, peak {max(rss) / 2**20:.0f} MB: growth "
          f"{(max(rss) - rss_before) / 2**20:.0f} MB (target < 150 MB)")
    print(f"5xx answers: {server_errors} (target 0); unanswered: {len(unanswered)} {unanswered[:5]}")
    print(f"hostile requests accepted: {len(accepted)} {accepted}; stored for them: {grown or 'nothing'} "
          f"(target: nothing)")
    print(f"load: {open('/proc/loadavg').read().split()[:3]} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
