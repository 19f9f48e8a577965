"""The README's walkthrough, run as written, so it cannot rot.

The blocks are the fenced ones right after `<!-- walkthrough: server|shell|python -->` in
README.md. The server block runs in the background (its own process group, stopped at the end);
the shell block, then the python block, run in one bash in a fresh directory, with the CLI of this
checkout first on PATH. Only the port differs from the README: the server gets a free one through
`LORAMILL_PORT`, and the python block's `127.0.0.1:8000` is pointed there. The default data
directory (platformdirs, under this test's own `XDG_DATA_HOME`) is what the blocks use.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services import free_port

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough_blocks(text: str) -> dict[str, str]:
    """{"server": ..., "shell": ..., "python": ...}: the code of the fenced block after each marker."""
    blocks = dict(re.findall(r"<!-- walkthrough: (\w+) -->\s*```\w*\n(.*?)```", text, re.DOTALL))
    assert set(blocks) == {"server", "shell", "python"}, sorted(blocks)
    return blocks


def test_the_walkthrough_blocks_are_found():
    blocks = walkthrough_blocks(README.read_text())
    assert blocks["server"].strip() == "loramill serve"
    assert "extra_body" in blocks["python"] and '"adapters": [{"adapter"' in blocks["python"]
    assert "127.0.0.1:8000" in blocks["python"]


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    blocks = walkthrough_blocks(README.read_text())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env.update({"XDG_DATA_HOME": str(tmp_path / "xdg-data"), "LORAMILL_PORT": str(port),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PIP_NO_INDEX": "1"})  # `pip install openai` finds it installed (the [test] extra); never the network
    work = tmp_path / "work"
    work.mkdir()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 — closed below
    server = subprocess.Popen(["bash", "-euo", "pipefail", "-c", blocks["server"]], cwd=work, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while f"ready on http://127.0.0.1:{port}/" not in (tmp_path / "server.log").read_text(errors="replace"):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        (work / "walkthrough.py").write_text(blocks["python"].replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        script = blocks["shell"] + f'\n"{sys.executable}" walkthrough.py\n'
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                             text=True, timeout=900)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "server.log").read_text()[-3000:]
    out = run.stdout
    assert "The job has successfully completed" in out
    assert re.search(r"^fine-tuned model: ft:tiny:acme:capitals:ftjob-\w+$", out, re.MULTILINE)
    assert re.search(r"^answer: ", out, re.MULTILINE)
    assert out.count("sha256 ok") >= 4 and "merged checkpoint in" in out
    merged = work / "merged"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    assert (tmp_path / "xdg-data" / "loramill" / "loramill.db").is_file()  # the per-user default, from any directory
