"""`loramill demo`, the README's main job: the whole flow over HTTP in the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_trains_merges_downloads_and_shows_the_learned_behaviour(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMILL_")}
    env["LORAMILL_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-c", "from loramill.cli import main; main()", "demo"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "4. job succeeded" in out and "5. merge" in out
    assert out.count("… ok") >= 8 and "mismatch" not in out  # every downloaded file's sha256 checked
    before = next(line for line in out.splitlines() if line.strip().startswith("before:"))
    after = next(line for line in out.splitlines() if line.strip().startswith("after:"))
    assert "capital of" not in before and "The capital of" in after
    streamed = next(line for line in out.splitlines() if line.strip().startswith("after (the fine-tuned model):"))
    assert "The capital of" in streamed  # the same answer, streamed from /v1/chat/completions
    assert (tmp_path / "data" / "demo-server.log").exists()
