"""`loramill jobs list | show ID | follow ID`: a tenant's fine-tuning jobs, through the HTTP API.

These are clients of a running `loramill serve`, as the `openai` SDK is: they reach it at
`LORAMILL_API_URL` (default `http://LORAMILL_HOST:LORAMILL_PORT`) with the tenant key in
`LORAMILL_API_KEY` (or `--url` / `--api-key`), and see exactly what the API shows that tenant.

`follow` draws one status line: a progress bar, the step, the latest training loss, the ETA and
a sparkline of the loss so far, e.g.

    [██████████░░░░░░░░░░]  12/24  loss 1.2840  ETA 0:07  █▇▆▅▅▄▃▃▂▂▁▁

and prints the job's other events above it. It exits with the job's outcome: 0 succeeded,
1 failed, 3 cancelled (2 is every command's status for an input error).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

import click
import httpx

from adapters.errors import InputError

FINISHED = ("succeeded", "failed", "cancelled")
EXIT_STATUS = {"succeeded": 0, "failed": 1, "cancelled": 3}
SPARK_LEVELS = "▁▂▃▄▅▆▇█"


def register(main: click.Group) -> None:
    main.add_command(jobs)


def api_client(url: str | None, api_key: str | None, timeout_s: float = 30) -> httpx.Client:
    """An `httpx.Client` on the API with the tenant's key; the settings fill what the options leave out."""
    from loramill.settings import get_settings

    settings = get_settings()
    key = api_key or settings.api_key
    if not key:
        raise InputError("no API key: pass --api-key or set LORAMILL_API_KEY (a tenant's key, from "
                         "`loramill tenant create`)", param="api_key")
    return httpx.Client(base_url=(url or settings.resolved_api_url).rstrip("/"), timeout=timeout_s,
                        headers={"Authorization": f"Bearer {key}"})


def call(client: httpx.Client, method: str, path: str, **kwargs) -> dict:
    """One API call's JSON; the API's error message (OpenAI's shape) or an unreachable server as `InputError`."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise InputError(f"cannot reach the loramill API at {client.base_url} ({type(exc).__name__}); is "
                         "`loramill serve` running there? (set LORAMILL_API_URL or pass --url)") from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        raise InputError(f"{response.status_code}: {message}")
    return response.json()


def sparkline(values: list[float], width: int = 24) -> str:
    """`values` as one line of block characters, lowest ▁ to highest █, averaged into at most `width` buckets."""
    if not values:
        return ""
    if len(values) > width:  # bucket i averages values[i*n/width : (i+1)*n/width]
        n = len(values)
        values = [sum(chunk) / len(chunk) for chunk in
                  (values[i * n // width:(i + 1) * n // width] for i in range(width)) if chunk]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    top = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[round((v - low) / span * top)] for v in values)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def status_line(step: int, total: int, loss: float | None, eta_s: float | None, losses: list[float],
                bar_width: int = 20) -> str:
    """`[████░░░░]  step/total  loss L  ETA m:ss  ▇▆▅▃▂` (what `follow` redraws)."""
    filled = round(bar_width * step / total) if total else 0
    parts = [f"[{'█' * filled}{'░' * (bar_width - filled)}]", f"{step:>{len(str(total))}}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    parts.append(sparkline(losses))
    return "  ".join(p for p in parts if p)


def new_events(client: httpx.Client, job_id: str, seen: set[str]) -> list[dict]:
    """The job's events not in `seen`, oldest first (the API lists newest first; page back until a seen one)."""
    fresh: list[dict] = []
    after = None
    while True:
        params = {"limit": 200, **({"after": after} if after else {})}
        page = call(client, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
        unseen = [e for e in page["data"] if e["id"] not in seen]
        fresh.extend(unseen)
        if len(unseen) < len(page["data"]) or not page.get("has_more") or not page["data"]:
            break
        after = page["data"][-1]["id"]
    seen.update(e["id"] for e in fresh)
    return fresh[::-1]


class _StatusLine:
    """Redraws one line on a terminal (`\\r`); elsewhere (a pipe, a log) writes a line when the step changes."""

    def __init__(self, stream):
        self.stream, self.tty = stream, stream.isatty()
        self.shown, self.last = "", None

    def draw(self, text: str, step: int) -> None:
        if self.tty:
            pad = max(0, len(self.shown) - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.shown = text
        elif step != self.last:
            self.stream.write(text + "\n")
        self.last = step
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.tty and self.shown:
            self.stream.write("\r" + " " * len(self.shown) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self.shown:
            self.stream.write(self.shown)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def follow_job(client: httpx.Client, job_id: str, *, poll_s: float = 0.5, stream=None) -> dict:
    """Follow job `job_id` until it finishes, drawing its progress on `stream` (stderr); returns the finished job."""
    line = _StatusLine(stream or sys.stderr)
    seen: set[str] = set()
    losses: list[float] = []
    step = total = 0
    loss = None
    try:
        while True:
            job = call(client, "GET", f"/v1/fine_tuning/jobs/{job_id}")
            for event in new_events(client, job_id, seen):
                if event.get("type") == "metrics" and event.get("data"):
                    data = event["data"]
                    step, total, loss = data["step"], data["total_steps"], data["train_loss"]
                    losses.append(loss)
                else:
                    line.message(event["message"])
            if total:
                finish = job.get("estimated_finish")
                eta = max(0.0, finish - time.time()) if finish and job["status"] not in FINISHED else None
                line.draw(status_line(step, total, loss, eta, losses), step)
            if job["status"] in FINISHED:
                return job
            time.sleep(poll_s)
    finally:
        line.close()


def _when(timestamp: int | None) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


_client_options = [
    click.option("--url", default=None, help="The API; default: LORAMILL_API_URL, else http://LORAMILL_HOST:LORAMILL_PORT."),
    click.option("--api-key", default=None, help="A tenant's API key; default: LORAMILL_API_KEY."),
]


def client_options(command):
    for option in reversed(_client_options):
        command = option(command)
    return command


@click.group()
def jobs() -> None:
    """Your fine-tuning jobs on a running server: list, show, follow."""


@jobs.command("list")
@client_options
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
def jobs_list(url: str | None, api_key: str | None, limit: int) -> None:
    """The newest jobs: id, status, base model, fine-tuned model, created (UTC)."""
    with api_client(url, api_key) as client:
        rows = call(client, "GET", "/v1/fine_tuning/jobs", params={"limit": limit})["data"]
    if not rows:
        click.echo("no fine-tuning jobs", err=True)
        return
    width = max(len(r["id"]) for r in rows)
    for r in rows:
        click.echo(f"{r['id']:<{width}}  {r['status']:<19}  {r['model']:<20}  {_when(r['created_at'])}  "
                   f"{r.get('fine_tuned_model') or '-'}")


@jobs.command("show")
@click.argument("job_id")
@client_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's job object as JSON.")
def jobs_show(job_id: str, url: str | None, api_key: str | None, as_json: bool) -> None:
    """One job: status, model, hyperparameters, LoRA settings, result."""
    with api_client(url, api_key) as client:
        job = call(client, "GET", f"/v1/fine_tuning/jobs/{job_id}")
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    hp = job.get("hyperparameters") or {}
    fields = [
        ("id", job["id"]), ("status", job["status"]), ("model", job["model"]),
        ("fine-tuned model", job.get("fine_tuned_model") or "-"),
        ("training file", job.get("training_file")), ("validation file", job.get("validation_file") or "-"),
        ("hyperparameters", ", ".join(f"{k}={v}" for k, v in hp.items())),
        ("lora", ", ".join(f"{k}={v}" for k, v in (job.get("lora") or {}).items())),
        ("trained tokens", job.get("trained_tokens") or "-"),
        ("created", _when(job.get("created_at"))), ("finished", _when(job.get("finished_at"))),
    ]
    if job.get("error"):
        fields.append(("error", job["error"].get("message")))
    for name, value in fields:
        click.echo(f"{name + ':':<17} {value}")


@jobs.command("follow")
@click.argument("job_id")
@client_options
def jobs_follow(job_id: str, url: str | None, api_key: str | None) -> None:
    """Show a job's progress live (bar, loss, ETA, loss sparkline) until it ends.

    Exits 0 when the job succeeded, 1 when it failed, 3 when it was cancelled.
    """
    with api_client(url, api_key) as client:
        job = follow_job(client, job_id)
    if job["status"] == "succeeded":
        click.echo(f"succeeded: {job['fine_tuned_model']} ({job.get('trained_tokens')} tokens trained)")
    elif job["status"] == "failed":
        click.echo(f"failed: {(job.get('error') or {}).get('message', 'no message')}", err=True)
    else:
        click.echo("cancelled", err=True)
    sys.exit(EXIT_STATUS[job["status"]])
