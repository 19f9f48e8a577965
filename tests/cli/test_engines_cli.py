"""`loramill engines list | drain | resume`: the drained set lives in the job store, for every API process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jobs.db import database
from jobs.engine_drains import drained


def run(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from loramill.cli import main; main()", "engines", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_drain_list_and_resume_through_the_store(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env.update({"LORAMILL_DATA_DIR": str(tmp_path), "LORAMILL_ENGINE_URLS": json.dumps(
        {"tiny": ["http://10.0.0.1:8100", "http://10.0.0.2:8100/"], "other": "http://10.0.0.3:8100"})})
    assert run(env, "drain", "http://10.0.0.2:8100/").returncode == 0
    assert run(env, "drain", "http://10.0.0.2:8100").returncode == 0  # again: still drained once
    with database(f"sqlite:///{tmp_path / 'loramill.db'}").sessions() as session:
        assert drained(session) == {"http://10.0.0.2:8100"}
    assert run(env, "list").stdout.splitlines() == ["tiny  http://10.0.0.1:8100  serving",
                                                    "tiny  http://10.0.0.2:8100  drained",
                                                    "other  http://10.0.0.3:8100  serving"]
    assert run(env, "resume", "http://10.0.0.2:8100").returncode == 0
    again = run(env, "resume", "http://10.0.0.2:8100")
    assert again.returncode == 2 and again.stderr.strip() == "error: engine http://10.0.0.2:8100 is not drained"
    assert "drained" not in run(env, "list").stdout
    for bad in ("10.0.0.9:8100", "http://" + "h" * 2048):
        refused = run(env, "drain", bad)
        assert refused.returncode == 2 and refused.stderr.startswith("error: an engine URL is http(s)://")
