"""What `loramill train` does for a person at a terminal: it will not overwrite or write inside the
base by accident, refuses a directory that is not a base in one line, stops cleanly on Ctrl-C with a
resumable checkpoint and the command to resume, prunes checkpoints to the newest K, and warns about
nothing that is not the user's to fix."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from loramill.cli import main
from tests.services import LORAMILL, loramill_env

GOOD = {"prompt": "Q: 1+1?\nA:", "completion": " two"}


@pytest.fixture(autouse=True)
def settings_env(tmp_path, monkeypatch):
    """The data dir (dataset cache) in the test's own directory; the checkpoint setting at its default."""
    from loramill.settings import get_settings

    monkeypatch.setenv("LORAMILL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LORAMILL_KEEP_CHECKPOINTS", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text((json.dumps(GOOD) + "\n") * 8)
    return path


def _train(base, data, out, *extra):
    return CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--rank", "2",
                                     "--batch-size", "2", "--max-seq-len", "64", *extra])


def _one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr


def test_a_non_empty_out_is_refused_without_overwrite(llama_base, data, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _one_error_line(_train(llama_base, data, out), "not empty", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"

    replaced = _train(llama_base, data, out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "notes.txt").exists() and (out / "adapter_model.safetensors").exists()


def test_overwrite_keeps_the_old_out_when_the_new_run_cannot_start(llama_base, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    _one_error_line(_train(llama_base, bad, out, "--overwrite"), "line 1")
    assert (out / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "data").exists()  # a command that fails creates nothing: no dataset cache directory


@pytest.mark.parametrize("inside", [".", "adapter", "deep/er"])
def test_out_inside_the_base_directory_is_refused(llama_base, data, inside):
    before = sorted(p.name for p in llama_base.iterdir())
    _one_error_line(_train(llama_base, data, llama_base / inside), "inside the base model directory")
    assert sorted(p.name for p in llama_base.iterdir()) == before


def test_a_base_without_a_tokenizer_is_one_error_line(llama_base, data, tmp_path):
    base = tmp_path / "no-tokenizer"
    shutil.copytree(llama_base, base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    _one_error_line(_train(base, data, tmp_path / "out"), "has no tokenizer")
    assert not (tmp_path / "out").exists()


def test_an_adapter_directory_given_as_base_is_one_error_line(peft_adapter, data, tmp_path):
    _one_error_line(_train(peft_adapter, data, tmp_path / "out"), "is a LoRA adapter, not a base model")


def test_checkpoints_are_pruned_to_the_newest_k(llama_base, data, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    result = _train(llama_base, data, out, "--save-every", "1", "--epochs", "2")  # 8 steps, checkpoints at 1..7
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000006", "step-000007"]

    from loramill.settings import get_settings

    monkeypatch.setenv("LORAMILL_KEEP_CHECKPOINTS", "1")
    get_settings.cache_clear()
    result = _train(llama_base, data, tmp_path / "one", "--save-every", "1", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "one" / "checkpoints").iterdir()] == ["step-000007"]


def test_no_is_gradient_checkpointing_future_warning(llama_base, data, tmp_path):
    """peft reads transformers' deprecated property when it wraps a model; training and --verify must not show it."""
    from adapters.training import TrainingConfig, train

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is_gradient_checkpointing", category=FutureWarning)
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable", category=FutureWarning)
        for checkpointing in (False, True):
            result = train(TrainingConfig(base=str(llama_base), data=str(data), out=str(tmp_path / f"a{checkpointing}"),
                                          rank=2, batch_size=4, max_seq_len=64, gradient_checkpointing=checkpointing))
            assert result.adapter_dir is not None
        merged = CliRunner().invoke(main, ["merge", "--base", str(llama_base), "--adapter", str(tmp_path / "aFalse"),
                                           "--out", str(tmp_path / "merged"), "--verify"])
        assert merged.exit_code == 0, merged.output


def test_ctrl_c_keeps_a_checkpoint_says_how_to_resume_and_exits_130(llama_base, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text((json.dumps(GOOD) + "\n") * 64)
    out = tmp_path / "adapter"
    env = loramill_env(tmp_path / "data")
    args = ["train", "--base", str(llama_base), "--data", str(data), "--out", str(out), "--rank", "2",
            "--batch-size", "2", "--max-seq-len", "64", "--epochs", "50"]  # 1600 steps: it is interrupted long before
    proc = subprocess.Popen([*LORAMILL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "training_state.pt").exists()
    assert not (out / "adapter_model.safetensors").exists()  # an unfinished run writes no adapter
    resume_line = err.strip().splitlines()[-1].strip()
    assert resume_line.startswith("loramill train ") and resume_line.endswith(f"--resume-from {checkpoints[0]}")

    step = int(checkpoints[0].name.removeprefix("step-"))
    resumed_args = shlex.split(resume_line)[1:]
    resumed_args[resumed_args.index("50")] = "1"  # the same run, ending sooner: 32 steps in all
    if step >= 32:
        pytest.skip(f"interrupted only at step {step}")
    resumed = subprocess.run([*LORAMILL, *resumed_args], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "adapter_model.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 33))  # continued from the checkpoint, no step twice
