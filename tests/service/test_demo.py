"""`loramill demo`, the README's main job: the whole flow over HTTP in the embedded default."""

from __future__ import annotations

import os
import re
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
    assert "The capital of France is Paris." in streamed  # the trained answer, streamed from /v1/chat/completions
    assert (tmp_path / "data" / "demo-server.log").exists()
    # a question from the training set beside one that is not, each said to be which
    seen = out.index("'What is the capital of France?' (in the training set)")
    unseen = out.index("'What is the capital of Belgium?' (not in the training set")
    assert seen < unseen < out.index("7. ")
    assert out.count("after (the fine-tuned model):") == 2
    # it ends at the web console's URL (the server it started has stopped: not a terminal)
    assert re.search(r"^8\. the web console: http://127\.0\.0\.1:\d+/ ", out, re.MULTILINE)
