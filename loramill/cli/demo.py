"""`loramill demo`: the whole product through its HTTP API, as a user would drive it.

make a small base → register it (admin) → upload the sample dataset → create a fine-tuning job →
follow its events with a progress bar → merge the fine-tuned adapter into the base → download every
file, checking each sha256 → stream chat answers from the base and from the fine-tuned model
through `/v1/chat/completions`, to a question in the training set and to one that is not → load
the merged checkpoint with plain transformers and compare a greedy generation before and after →
point at the web console.

With no `--url`, it starts `loramill serve` (embedded: API + worker, no Redis, no PostgreSQL) on a
free port over the settings' data directory, with a fresh admin key and a fresh tenant; on a
terminal it keeps that server running at the end (Ctrl-C stops it) so the console can be opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import click
import httpx

from adapters.errors import InputError
from loramill.cli.jobs_cmd import follow_job

SAMPLE = "capitals.jsonl"  # in the package's data folder (importlib.resources)
SEEN_QUESTION = "What is the capital of France?"  # a line of SAMPLE
UNSEEN_QUESTION = "What is the capital of Belgium?"  # no line of SAMPLE names Belgium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, admin_key: str, port: int) -> subprocess.Popen:
    """`loramill serve` (API + embedded worker) with its logs in `<data_dir>/demo-server.log`."""
    env = {**os.environ, "LORAMILL_DATA_DIR": str(data_dir), "LORAMILL_ADMIN_KEY": admin_key}
    env.pop("LORAMILL_BROKER_URL", None)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "demo-server.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-c", "from loramill.cli import main; main()", "serve", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, server: subprocess.Popen | None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise click.ClickException(f"server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise click.ClickException(f"server at {url} not ready after {timeout_s:.0f}s")


def checked(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise click.ClickException(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                                   f"{response.text[:500]}")
    return response.json()


def poll(client: httpx.Client, path: str, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        obj = checked(client.get(path))
        if obj["status"] in ("succeeded", "failed", "cancelled"):
            return obj
        time.sleep(0.5)
    raise click.ClickException(f"{path} did not finish in {timeout_s:.0f}s")


def download_merge(client: httpx.Client, merge_id: str, out: Path) -> Path:
    files = checked(client.get(f"/v1/merges/{merge_id}/files"))["data"]
    out.mkdir(parents=True, exist_ok=True)
    for entry in files:
        digest = hashlib.sha256()
        with client.stream("GET", f"/v1/merges/{merge_id}/files/{entry['name']}") as response:
            if response.status_code != 200:
                raise click.ClickException(f"download of {entry['name']} failed: {response.status_code}")
            with open(out / entry["name"], "wb") as f:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    f.write(chunk)
        if digest.hexdigest() != entry["sha256"] or response.headers["x-content-sha256"] != entry["sha256"]:
            raise click.ClickException(f"{entry['name']}: sha256 mismatch after download")
        click.echo(f"  {entry['name']}: {entry['bytes']} bytes, sha256 {entry['sha256'][:16]}… ok")
    return out


def generate(model_dir: Path, prompt: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def stream_chat(client: httpx.Client, model: str, prompt: str) -> str:
    """A greedy chat answer streamed from `/v1/chat/completions` (server-sent events), echoed as it arrives."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0,
            "stream": True}
    text = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            checked(response)
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[len("data: "):])["choices"]:
                    piece = choice["delta"].get("content") or ""
                    click.echo(piece, nl=False)
                    text.append(piece)
    click.echo("")
    return "".join(text)


def run_demo(*, url: str | None, api_key: str | None, admin_key: str | None, out: str | None,
             keep_serving: bool | None = None) -> None:
    from transformers.utils import logging as hf_logging

    from adapters.basemodel import BaseModelSpec, create_base_model
    from loramill.settings import get_settings

    hf_logging.disable_progress_bar()  # the demo draws its own progress
    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    out_dir = Path(out).resolve() if out else data_dir / "demo"
    run = secrets.token_hex(3)
    server = None
    if url is None:
        from jobs.db import database, migrate
        from jobs.tenants import create_tenant

        migrate(settings.resolved_database_url)
        with database(settings.resolved_database_url).sessions() as session:
            _, api_key = create_tenant(session, f"demo-{run}")
        admin_key = secrets.token_urlsafe(24)
        port = free_port()
        click.echo(f"starting loramill serve on 127.0.0.1:{port} (data dir {data_dir})")
        server = start_server(data_dir, admin_key, port)
        url = f"http://127.0.0.1:{port}"
    elif not (api_key and admin_key):
        raise InputError("--url needs --api-key (a tenant's key) and --admin-key", param="url")
    if keep_serving is None:
        keep_serving = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        wait_ready(url, server)
        _flow(url, api_key, admin_key, out_dir, run, create_base_model, BaseModelSpec)
        click.echo(f"8. the web console: {url}/ (sign in with this tenant's API key: {api_key})")
        if server is not None and keep_serving:
            click.echo("   the server keeps running for it; Ctrl-C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        elif server is not None:
            click.echo(f"   this demo's server has stopped; `loramill serve` serves the same data at "
                       f"http://{settings.host}:{settings.port}/")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


def _flow(url, api_key, admin_key, out_dir: Path, run: str, create_base_model, BaseModelSpec) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        base_dir = out_dir / "base"
        if not (base_dir / "config.json").exists():
            create_base_model(base_dir, BaseModelSpec())
        base_name = f"demo-llama-{run}"
        checked(client.post("/v1/models", json={"name": base_name, "path": str(base_dir)},
                            headers={"Authorization": f"Bearer {admin_key}"}))
        click.echo(f"1. registered base model {base_name}")
        with (resources.files("loramill") / "data" / SAMPLE).open("rb") as f:
            upload = checked(client.post("/v1/files", data={"purpose": "fine-tune"},
                                         files={"file": (SAMPLE, f, "application/jsonl")}))
        click.echo(f"2. uploaded {upload['filename']} as {upload['id']} ({upload['bytes']} bytes)")
        job = checked(client.post("/v1/fine_tuning/jobs", json={  # every hyperparameter "auto"
            "model": base_name, "training_file": upload["id"], "suffix": "capitals", "seed": 0}))
        click.echo(f"3. created fine-tuning job {job['id']} ({job['status']})")
        job = follow_job(client, job["id"])  # the progress line `loramill jobs follow` draws
        if job["status"] != "succeeded":
            raise click.ClickException(f"job {job['id']} {job['status']}: {json.dumps(job['error'])}")
        click.echo(f"4. job succeeded: {job['fine_tuned_model']} ({job['trained_tokens']} tokens)")
        merge = checked(client.post("/v1/merges", json={"base_model": base_name,
                                                       "adapters": [{"adapter": job["fine_tuned_model"], "weight": 1.0}]}))
        merge = poll(client, f"/v1/merges/{merge['id']}")
        if merge["status"] != "succeeded":
            raise click.ClickException(f"merge {merge['id']} {merge['status']}: {json.dumps(merge['error'])}")
        click.echo(f"5. merge {merge['id']} succeeded; downloading")
        merged = download_merge(client, merge["id"], out_dir / "merged" / merge["id"])
        prompt = SEEN_QUESTION
        click.echo("6. answers streamed from /v1/chat/completions, before (the base model) and after (the fine-tuned one):")
        for question, which in ((SEEN_QUESTION, "in the training set"),
                                (UNSEEN_QUESTION, "not in the training set: what the model learned beyond its lines")):
            click.echo(f"   {question!r} ({which})")
            click.echo("     before (the base model): ", nl=False)
            stream_chat(client, base_name, question)
            click.echo("     after (the fine-tuned model): ", nl=False)
            stream_chat(client, job["fine_tuned_model"], question)
    click.echo(f"7. {prompt!r} to the downloaded merged checkpoint, with plain transformers:")
    click.echo(f"   before: {generate(base_dir, prompt)!r}")
    click.echo(f"   after:  {generate(merged, prompt)!r}")
    click.echo(f"merged checkpoint: {merged}")
