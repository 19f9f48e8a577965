"""The LoRA training loop against real peft/transformers on a tiny base."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.errors import InputError
from adapters.training import LoraTrainer, TrainingConfig, train

SAMPLE = Path(__file__).resolve().parents[2] / "loramill" / "data" / "capitals.jsonl"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """24 chat samples from the shipped sample set: enough to see learning, fast to train."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:24]))
    return path


@pytest.fixture
def cfg(llama_base, small_data, tmp_path) -> TrainingConfig:
    return TrainingConfig(base=str(llama_base), data=str(small_data), out=str(tmp_path / "adapter"),
                          rank=4, alpha=8, batch_size=4, lr=5e-3, epochs=2, max_seq_len=128,
                          cache_dir=str(tmp_path / "cache"))


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_loss_falls_and_peft_loads_the_adapter_with_identical_logits(cfg, llama_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = LoraTrainer(replace(cfg, epochs=4), progress=None, base_model=None)
    result = trainer.run()
    losses = [json.loads(line)["loss"] for line in result.metrics_path.read_text().splitlines()]
    assert len(losses) == result.steps == 24
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    ids = torch.tensor([[256, 258, 117, 115, 101, 114, 10, 72, 105, 257]])
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(input_ids=ids).logits
    trainer.close()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base), result.adapter_dir).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8


def test_same_seed_same_adapter_other_seed_differs(cfg, tmp_path):
    first = train(cfg)
    second = train(replace(cfg, out=str(tmp_path / "again")))
    third = train(replace(cfg, out=str(tmp_path / "other"), seed=1))
    a, b, c = _adapter(first.adapter_dir), _adapter(second.adapter_dir), _adapter(third.adapter_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _records(metrics_path: Path) -> list[dict]:
    """metrics.jsonl without its timing field (tokens_per_s differs between runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in metrics_path.read_text().splitlines()]


def test_resume_into_a_fresh_out_equals_the_uninterrupted_run(cfg, small_data, tmp_path):
    """As a retried job does: each attempt trains into its own directory and resumes from a
    checkpoint of an earlier attempt, mid-epoch (step 3) or at an epoch's end (step 6 of 6)."""
    run = replace(cfg, save_every=3, dropout=0.1, validation=str(small_data))
    full = train(run)
    assert [p.name for p in full.checkpoints] == ["step-000003", "step-000006", "step-000009"]
    records = _records(full.metrics_path)
    assert [r["step"] for r in records if r["val_loss"] is not None] == [6, 12]  # evaluated at each epoch's end
    assert _records(full.checkpoints[1] / "metrics.jsonl") == records[:6]  # steps 1-6, epoch 1's evaluation on 6

    for checkpoint in full.checkpoints[:2]:
        resumed = train(replace(run, out=str(tmp_path / f"attempt-{checkpoint.name}"), resume_from=str(checkpoint)))
        assert resumed.steps == full.steps and resumed.val_loss == full.val_loss
        a, b = _adapter(full.adapter_dir), _adapter(resumed.adapter_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert _records(resumed.metrics_path) == records


def test_resume_into_the_same_out_drops_what_the_interrupted_run_logged_later(cfg, tmp_path):
    full = train(replace(cfg, save_every=4))
    resumed = train(replace(cfg, save_every=4, resume_from=str(full.checkpoints[0])))
    assert _records(resumed.metrics_path) == _records(full.metrics_path)


def test_gradient_accumulation_matches_the_large_batch(cfg, tmp_path):
    big = train(replace(cfg, batch_size=8, epochs=1))
    accumulated = train(replace(cfg, out=str(tmp_path / "acc"), batch_size=4, grad_accum=2, epochs=1))
    assert big.steps == accumulated.steps == 3
    a, b = _adapter(big.adapter_dir), _adapter(accumulated.adapter_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_progress_reports_and_cancellation_stops_without_an_adapter(cfg):
    seen = []

    def progress(p):
        seen.append(p)
        return p.step == 2

    result = train(cfg, progress=progress)
    assert result.stopped and result.steps == 2 and result.adapter_dir is None
    assert not (Path(cfg.out) / "adapter_model.safetensors").exists()
    first = seen[0]
    assert first.total_steps == 12 and first.tokens_seen > 0 and first.tokens_per_s > 0 and first.lr > 0


def test_validation_loss_and_base_model_left_untouched(cfg, llama_base, small_data):
    from adapters.training import load_base_model

    base = load_base_model(llama_base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    seen = []
    result = train(replace(cfg, validation=str(small_data), epochs=1), base_model=base, progress=seen.append)
    assert result.val_loss is not None and result.val_loss > 0
    # evaluated at the epoch's end: the progress callback (the job's events, the console's curve) sees it there
    assert [p.val_loss for p in seen] == [None] * (len(seen) - 1) + [result.val_loss]
    logged = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_loss"] for m in logged] == [p.val_loss for p in seen]  # one line per step, no extra eval lines
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gpt2_conv1d_and_rslora_train(make_base, small_data, tmp_path):
    base = make_base(arch="gpt2", tie_embeddings=True)
    result = train(TrainingConfig(base=str(base), data=str(small_data), out=str(tmp_path / "a"), rank=4,
                                  use_rslora=True, batch_size=8, max_steps=2, max_seq_len=128,
                                  cache_dir=str(tmp_path / "cache")))
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["fan_in_fan_out"]
    assert any("c_attn" in k for k in _adapter(result.adapter_dir))


def test_gpt_neox_head_trains_by_its_module_name(make_base, small_data, tmp_path):
    """GPT-NeoX stores its head `lm_head` as `embed_out.weight`: the target is the module's name."""
    from adapters.peft_format import validate_adapter

    base = make_base(arch="gpt_neox")
    result = train(TrainingConfig(base=str(base), data=str(small_data), out=str(tmp_path / "a"), rank=4,
                                  targets=("query_key_value", "lm_head"), batch_size=8, max_steps=2, max_seq_len=128,
                                  cache_dir=str(tmp_path / "cache")))
    weights = _adapter(result.adapter_dir)
    assert weights["base_model.model.lm_head.lora_B.weight"].abs().max() > 0  # trained from its zero init
    assert "lm_head" in validate_adapter(result.adapter_dir, base, max_rank=8).loras


def test_packed_training_sees_the_same_real_tokens_in_fewer_steps(cfg, tmp_path):
    unpacked = train(replace(cfg, epochs=1))
    packed = train(replace(cfg, out=str(tmp_path / "p"), packing=True, batch_size=2, max_seq_len=256, epochs=1))
    assert packed.trained_tokens == unpacked.trained_tokens  # padding is never counted
    assert packed.steps < unpacked.steps and packed.final_loss > 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rank=0), "rank must be positive"),
        (dict(rank=-3), "rank must be positive"),
        (dict(rank=4096), "above the maximum"),
        (dict(targets=("q_proj", "nonexistent_proj")), "unknown target module 'nonexistent_proj'"),
        (dict(dropout=1.5), "dropout"),
        (dict(base="/does/not/exist"), "does not exist"),
        (dict(sharding="zero3"), "sharding must be one of auto, ddp, fsdp"),
        (dict(sharding="fsdp"), "sharding 'fsdp' needs devices > 1"),  # refused, not ignored: one process can't shard
    ],
)
def test_bad_options_are_refused(cfg, change, message):
    with pytest.raises(InputError, match=message):
        train(replace(cfg, **change))
    assert not (Path(cfg.out) / "adapter_model.safetensors").exists()


def test_resume_from_a_directory_that_is_not_a_checkpoint(cfg, tmp_path):
    with pytest.raises(InputError, match="not a loramill training checkpoint"):
        train(replace(cfg, resume_from=str(tmp_path)))


def test_fewer_batches_than_one_accumulation_group_still_train(cfg, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(SAMPLE.read_text().splitlines(keepends=True)[0])
    result = train(replace(cfg, data=str(one), grad_accum=4, epochs=1))
    assert result.steps == 1 and result.final_loss > 0 and result.adapter_dir is not None


def test_a_loss_that_is_not_finite_fails_the_run_before_it_saves_anything(cfg, tmp_path):
    with pytest.raises(InputError, match="too large for this model") as failed:
        train(replace(cfg, lr=1e30, epochs=3))
    assert failed.value.code == "training_diverged"
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_a_stop_asked_between_micro_batches_drops_the_unfinished_step(cfg):
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) == 6  # the second micro-batch of the second step (grad_accum 4)

    result = train(replace(cfg, batch_size=1, grad_accum=4), should_stop=should_stop)
    assert result.stopped and result.steps == 1 and result.adapter_dir is None
