"""`loramill train` end to end through the CLI, and its refusals: one line, exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from loramill.cli import main

GOOD = {"prompt": "Q: 1+1?\nA:", "completion": " two"}


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch) -> Path:
    """`loramill train` caches tokenized datasets where the settings say (here: the test's own directory)."""
    from loramill.settings import get_settings

    cache = tmp_path / "dataset-cache"
    monkeypatch.setenv("LORAMILL_DATASET_CACHE_DIR", str(cache))
    get_settings.cache_clear()
    yield cache
    get_settings.cache_clear()


@pytest.fixture
def data(tmp_path) -> Path:
    return _write(tmp_path / "train.jsonl", [json.dumps(GOOD)] * 4)


def test_train_writes_a_peft_adapter_and_metrics(llama_base, data, dataset_cache, tmp_path):
    out = tmp_path / "adapter"
    result = _run("train", "--base", str(llama_base), "--data", str(data), "--out", str(out),
                  "--rank", "2", "--batch-size", "2", "--max-seq-len", "64", "--targets", "q_proj,v_proj")
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.stdout
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert any(dataset_cache.iterdir())  # the tokenized dataset, cached where LORAMILL_DATASET_CACHE_DIR says


def _bin_only_base(llama_base: Path, tmp_path: Path) -> Path:
    base = tmp_path / "pickled"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((llama_base / name).read_bytes())
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return base


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (['{"prompt": "a", "completion": "b"', json.dumps(GOOD)], [], "line 1"),
        ([json.dumps(GOOD), json.dumps({"prompt": "only a prompt"})], [], "line 2"),
        ([], [], "empty"),
        ([json.dumps({"messages": [{"role": "user", "content": "hi"}]})], [], "assistant"),
        ([json.dumps(GOOD)], ["--targets", "q_proj,warp_drive"], "warp_drive"),
        ([json.dumps(GOOD)], ["--rank", "0"], "rank must be positive"),
        ([json.dumps(GOOD)], ["--rank", "-4"], "rank must be positive"),
    ],
    ids=["malformed-json", "missing-field", "empty-file", "no-assistant-turn", "unknown-target", "rank-0", "rank-negative"],
)
def test_bad_input_is_one_line_and_exit_2(llama_base, tmp_path, lines, extra, message):
    data = _write(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "adapter"
    result = _run("train", "--base", str(llama_base), "--data", str(data), "--out", str(out), *extra)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not (out / "adapter_model.safetensors").exists()


def test_pickled_base_is_refused(llama_base, data, tmp_path):
    result = _run("train", "--base", str(_bin_only_base(llama_base, tmp_path)), "--data", str(data), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "safetensors only" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_base_is_refused(data, tmp_path):
    result = _run("train", "--base", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_data_file_is_refused(llama_base, tmp_path):
    result = _run("train", "--base", str(llama_base), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "none.jsonl" in result.stderr and len(result.stderr.strip().splitlines()) == 1
