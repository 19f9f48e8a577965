"""`loramill serve` says where it is and where its logs go; `loramill jobs list|show|follow` against it.

One real `loramill serve` (embedded worker, SQLite, filesystem broker) for the module, started
with `--port 0`: the test learns the URL only from the line `serve` prints once it is ready.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

import httpx
import pytest

from loramill.cli.jobs_cmd import SPARK_LEVELS, sparkline, status_line
from tests.service.conftest import chat_lines
from tests.services import LORAMILL, loramill, loramill_env, loramill_serve

pytestmark = pytest.mark.slow
QUICK = {"n_epochs": 2, "batch_size": 4, "max_seq_len": 64}  # 12 examples: 6 steps


@dataclass
class Served:
    url: str
    ready_line: str
    data_dir: object
    env: dict[str, str]  # a client's: LORAMILL_API_URL and LORAMILL_API_KEY set
    http: httpx.Client

    def create_job(self, hyperparameters: dict, **extra) -> dict:
        upload = self.http.post("/v1/files", data={"purpose": "fine-tune"},
                                files={"file": ("train.jsonl", chat_lines(12).encode(), "application/jsonl")})
        assert upload.status_code == 200, upload.text
        job = self.http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": upload.json()["id"],
                                                           "hyperparameters": hyperparameters, **extra})
        assert job.status_code == 200, job.text
        return job.json()


@pytest.fixture(scope="module")
def served(tmp_path_factory, llama_base):
    root = tmp_path_factory.mktemp("served")
    env = loramill_env(root / "data")
    key = loramill(env, "tenant", "create", "acme")
    assert key.returncode == 0, key.stderr
    assert loramill(env, "model", "add", "tiny", str(llama_base)).returncode == 0
    with loramill_serve(env, root / "serve.log") as (url, ready_line):
        client_env = {**env, "LORAMILL_API_URL": url, "LORAMILL_API_KEY": key.stdout.strip()}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key.stdout.strip()}"}, timeout=30) as http:
            yield Served(url, ready_line, root / "data", client_env, http)


def test_serve_prints_its_url_once_ready_and_where_its_logs_go(served):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", served.url)
    assert httpx.get(f"{served.url}/readyz").status_code == 200  # ready when it says so: API, store, broker, worker
    assert str(served.data_dir) in served.ready_line
    log_line = (served.data_dir.parent / "serve.log").read_text().splitlines()
    logs = log_line[log_line.index(served.ready_line) + 1]
    assert logs.startswith("logs: ") and str(served.data_dir / "worker.log") in logs and "engine-<base>.log" in logs
    assert (served.data_dir / "worker.log").stat().st_size > 0  # the worker's output is where the line says


def test_sparkline_and_status_line():
    assert sparkline([]) == ""
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"  # highest █, lowest ▁, the middle between
    assert sparkline([1.0] * 5) == "▁▁▁▁▁"
    assert len(sparkline(list(range(100)), width=24)) == 24
    line = status_line(5, 10, 1.23456, 75, [2.0, 1.5, 1.2], bar_width=10)
    assert line.startswith("[█████░░░░░]") and " 5/10" in line and "loss 1.2346" in line and "ETA 1:15" in line
    assert line.endswith("█▄▁")


def test_follow_shows_progress_and_exits_0_on_success_then_list_and_show(served):
    job = served.create_job(QUICK, suffix="quick")
    follow = subprocess.run([*LORAMILL, "jobs", "follow", job["id"]], env=served.env, capture_output=True, text=True,
                            timeout=300)
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.startswith("succeeded: ft:tiny:acme:quick:")
    progress = [line for line in follow.stderr.splitlines() if line.startswith("[")]
    assert progress and progress[-1].startswith("[" + "█" * 20 + "]") and " 6/6" in progress[-1]
    assert re.search(r"loss \d+\.\d{4}", progress[-1])
    assert re.search(f"[{SPARK_LEVELS}]{{6}}$", progress[-1])  # one character per step's loss so far
    assert "The job has successfully completed" in follow.stderr  # the other events, as lines

    listed = loramill(served.env, "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job["id"]))
    assert "succeeded" in row and "ft:tiny:acme:quick:" in row

    shown = loramill(served.env, "jobs", "show", job["id"])
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^status: +succeeded$", shown.stdout, re.MULTILINE)
    assert re.search(r"^hyperparameters: +n_epochs=2, batch_size=4", shown.stdout, re.MULTILINE)


def test_follow_exits_3_when_the_job_is_cancelled(served):
    job = served.create_job({**QUICK, "n_epochs": 50})  # 300 steps: long enough to cancel mid-run
    follow = subprocess.Popen([*LORAMILL, "jobs", "follow", job["id"]], env=served.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while served.http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "running":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.3)
        assert served.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        _, err = follow.communicate(timeout=120)
    finally:
        follow.kill()
    assert follow.returncode == 3, err
    assert err.rstrip().endswith("cancelled")


def test_client_errors_are_one_line(served):
    unknown = loramill(served.env, "jobs", "show", "ftjob-nope")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert unknown.stderr.startswith("error: 404: ") and "ftjob-nope" in unknown.stderr
    no_key = loramill({k: v for k, v in served.env.items() if k != "LORAMILL_API_KEY"}, "jobs", "list")
    assert no_key.returncode == 2 and no_key.stderr.startswith("error: no API key") and no_key.stderr.count("\n") == 1
    nobody = loramill({**served.env, "LORAMILL_API_URL": "http://127.0.0.1:9"}, "jobs", "list")
    assert nobody.returncode == 2 and nobody.stderr.startswith("error: cannot reach the loramill API at http://127.0.0.1:9")
