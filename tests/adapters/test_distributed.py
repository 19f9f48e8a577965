"""Training on 2 processes (gloo, CPU), DDP and FSDP: the same adapter as one process, and resume after a kill.

Tolerance: the 2-process gradient is the 1-process gradient summed in another order (each rank
sums its rows, then DDP's all-reduce, or under FSDP the all-reduce of the replicated LoRA
gradients, adds the two halves), so the runs agree to fp32 rounding, not bit for bit. Measured on
this tiny Llama (LoRA weights up to ~0.14): max |Δ| 6.6e-8 after 3 steps, 8.7e-6 after 24 steps
(the kill-and-resume run against one uninterrupted process), the same under DDP and FSDP.
Adam divides each update by √v, which turns a relative gradient difference of ~1e-7 into about
that relative weight difference, and the differences grow with the steps; `rtol=1e-4, atol=1e-5`
leaves two orders of margin at 3 steps and about 2x at 24 (the worst weight uses 53% of its
allowed |Δ|) for other CPUs' summation orders (and SIMD widths), while still failing on any real
mistake (a wrong loss scale, a missing all-reduce or a shifted batch moves weights by ≥1e-3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.training import TrainingConfig, train

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parents[2] / "loramill" / "data" / "capitals.jsonl"
LORAMILL = str(Path(sys.executable).with_name("loramill"))
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """21 samples: with batch 4 the epoch's last micro-batch has 1 row, so one rank gets none."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:21]))
    return path


@pytest.fixture
def cfg(llama_base, data, tmp_path) -> TrainingConfig:
    return TrainingConfig(base=str(llama_base), data=str(data), out=str(tmp_path / "one"), rank=4, alpha=8,
                          batch_size=4, grad_accum=2, lr=5e-3, epochs=1, max_seq_len=128,
                          cache_dir=str(tmp_path / "cache"))


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _losses(metrics: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}


@pytest.mark.parametrize("sharding, chosen", [("auto", "ddp"), ("fsdp", "fsdp")])  # auto: DDP on the CPU
def test_two_gloo_processes_give_the_one_process_adapter(cfg, tmp_path, sharding, chosen):
    one = train(cfg)
    seen, started = [], []
    two = train(replace(cfg, out=str(tmp_path / "two"), devices=2, sharding=sharding), progress=seen.append,
                on_start=started.append)
    assert one.steps == two.steps == 3 and not two.stopped  # 6 micro-batches, 2 per step
    assert [p.step for p in seen] == [1, 2, 3] and started[0].devices == 2 and started[0].sharding == chosen
    assert two.trained_tokens == one.trained_tokens
    if chosen == "fsdp":  # rank 0 held its DTensor shards: half of each base tensor (dim 0 padded to even)
        assert 0.45 * one.base_bytes_held < two.base_bytes_held < 0.55 * one.base_bytes_held
    else:
        assert two.base_bytes_held == one.base_bytes_held
    delta = _assert_same_adapter(_adapter(one.adapter_dir), _adapter(two.adapter_dir))
    print(f"{chosen}: max |adapter(2 processes) - adapter(1 process)| = {delta:.2e}")
    a, b = _losses(one.metrics_path), _losses(two.metrics_path)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= RTOL * abs(a[s]) for s in a)
    assert [p.name for p in (tmp_path / "two").iterdir()] != [] and not list(Path(two.adapter_dir).glob(".adapter.tmp-*"))


@pytest.mark.parametrize("sharding", ["auto", "fsdp"])
def test_a_stop_reaches_every_process(cfg, tmp_path, sharding):
    """The stop is relayed through the control directory while the ranks go on, so they may finish a step or two
    more before they see it (how many depends on the machine's load); they all stop, far before the 60 steps.
    Under FSDP every rank must run the same forwards (each gathers weights from all): a stop agreed between
    micro-batches keeps them in step."""
    result = train(replace(cfg, out=str(tmp_path / "two"), devices=2, epochs=20, sharding=sharding),
                   progress=lambda p: p.step == 2)
    assert result.stopped and 2 <= result.steps < 60 and result.adapter_dir is None
    assert not (tmp_path / "two" / "adapter_model.safetensors").exists()


def test_a_lost_lease_in_the_caller_kills_every_rank(cfg, tmp_path):
    """The worker's stop check raises `LeaseLost` when another attempt owns the job: the ranks must not train on."""
    class LeaseLost(Exception):
        pass

    seen, ranks = [], []

    def should_stop() -> bool:
        ranks.extend(r for r in _children(os.getpid()) if r not in ranks)
        if seen:
            raise LeaseLost
        return False

    with pytest.raises(LeaseLost):
        train(replace(cfg, out=str(tmp_path / "two"), devices=2, epochs=20), progress=seen.append,
              should_stop=should_stop)
    assert len(ranks) >= 2 and not [r for r in ranks if Path(f"/proc/{r}").exists() and _state(r) != "Z"]
    assert not (tmp_path / "two" / "adapter_model.safetensors").exists()


def test_a_rank_input_error_comes_back_as_one(cfg, tmp_path):
    from adapters.errors import InputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\n')
    with pytest.raises(InputError):
        train(replace(cfg, data=str(bad), devices=2))


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


@pytest.mark.parametrize("sharding", ["auto", "fsdp"])
def test_killed_mid_run_after_a_checkpoint_it_resumes_and_finishes(cfg, tmp_path, monkeypatch, sharding):
    """`kill -9` of `loramill train --devices 2` after its step-2 checkpoint: both ranks die with it;
    resumed from the checkpoint it ends at the right step with the uninterrupted run's adapter."""
    monkeypatch.setenv("LORAMILL_DATASET_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "killed"
    args = [LORAMILL, "train", "--base", cfg.base, "--data", cfg.data, "--out", str(out), "--rank", "4",
            "--alpha", "8", "--batch-size", "4", "--grad-accum", "1", "--lr", "5e-3", "--epochs", "4",
            "--max-seq-len", "128", "--save-every", "2", "--devices", "2", "--sharding", sharding]  # 24 steps
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), proc.communicate()
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{r}").exists() and "Z" not in _state(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [r for r in ranks if Path(f"/proc/{r}").exists() and "Z" not in _state(r)]  # the ranks died too
    assert not (out / "adapter_model.safetensors").exists()
    steps_before = max(_losses(out / "metrics.jsonl"))
    assert 2 <= steps_before < 24

    resumed = subprocess.run([*args, "--resume-from", str(checkpoint)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 24 steps" in resumed.stdout
    assert sorted(_losses(out / "metrics.jsonl")) == list(range(1, 25))  # each step once: 3.. redone after the kill
    uninterrupted = train(replace(cfg, out=str(tmp_path / "one"), grad_accum=1, epochs=4))
    delta = _assert_same_adapter(_adapter(uninterrupted.adapter_dir), _adapter(out))
    print(f"{sharding}: max |resumed 2-process adapter - uninterrupted 1-process adapter| = {delta:.2e}")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "Z"
