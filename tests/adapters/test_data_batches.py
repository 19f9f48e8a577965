"""iterate_batches: padding, packing exactness through real transformers forwards, determinism."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from adapters.data import DataConfig, batches_per_epoch, iterate_batches, pack_rows, tokenize_jsonl
from adapters.errors import InputError

PAD = 256
MAX_LEN = 96


@pytest.fixture(scope="module")
def tok(llama_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_base)


@pytest.fixture(scope="module")
def dataset(tok, tmp_path_factory):
    """29 distinct samples of 6..96 tokens in all three formats."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    records = []
    for i in range(29):
        def text(n):
            return " ".join(rng.choice(words) for _ in range(n))

        kind = i % 3
        if kind == 0:
            records.append({"text": f"{i} {text(rng.randint(1, 14))}"})
        elif kind == 1:
            records.append({"prompt": f"{i} {text(rng.randint(1, 6))} ->", "completion": f" {text(rng.randint(1, 6))}"})
        else:
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": f"{i} {text(rng.randint(1, 3))}"},
                        {"role": "assistant", "content": text(rng.randint(1, 3))},
                    ]
                }
            )
    path = tmp_path_factory.mktemp("data") / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = tokenize_jsonl(path, tok, DataConfig(max_seq_len=MAX_LEN))
    lengths = ds["length"][:]
    assert min(lengths) < 20 and max(lengths) > 60, lengths
    return ds


def epoch(ds, **kw):
    args = dict(batch_size=3, pad_id=PAD, max_seq_len=MAX_LEN, packing=True, shuffle=True, seed=0, epoch=0)
    args.update(kw)
    return list(iterate_batches(ds, **args))


def samples_in(batches) -> list[tuple[int, ...]]:
    """Every sample (as its token tuple) in the order the batches carry them."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            if "position_ids" in b:
                pos = b["position_ids"][r].tolist()
                starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
                for s, e in zip(starts, starts[1:]):
                    if (b["labels"][r, s:e] != -100).any():
                        out.append(tuple(b["input_ids"][r, s:e].tolist()))
            else:
                n = int(b["attention_mask"][r].sum())
                out.append(tuple(b["input_ids"][r, :n].tolist()))
    return out


def test_unpacked_batches_are_right_padded(dataset):
    batches = epoch(dataset, packing=False, shuffle=False)
    assert len(batches) == batches_per_epoch(dataset, batch_size=3, max_seq_len=MAX_LEN, packing=False) == 10
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    lengths = dataset["length"][:3]
    assert first["input_ids"].shape == (3, max(lengths))
    for key in first:
        assert first[key].dtype == torch.long
    for r, n in enumerate(lengths):
        assert first["input_ids"][r, :n].tolist() == dataset[r]["input_ids"]
        assert first["labels"][r, :n].tolist() == dataset[r]["labels"]
        assert first["attention_mask"][r].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (first["input_ids"][r, n:] == PAD).all() and (first["labels"][r, n:] == -100).all()
    assert batches[-1]["input_ids"].shape[0] == 29 - 27


def test_packed_rows_fit_and_carry_every_sample_once(dataset):
    batches = epoch(dataset)
    assert len(batches) == batches_per_epoch(dataset, batch_size=3, max_seq_len=MAX_LEN, packing=True)
    for b in batches:
        assert set(b) == {"input_ids", "position_ids", "attention_mask", "labels"}
        B, T = b["input_ids"].shape
        assert T <= MAX_LEN
        assert b["position_ids"].shape == (B, T) and b["attention_mask"].shape == (B, 1, T, T)
        assert b["attention_mask"].dtype == torch.float32
    expected = sorted(tuple(x) for x in dataset["input_ids"][:])
    assert sorted(samples_in(batches)) == expected
    total = sum(dataset["length"][:])
    rows = sum(b["input_ids"].shape[0] for b in batches)
    assert rows < 29 and rows <= -(-total // MAX_LEN) + 2  # near the lower bound


def test_packed_mask_is_block_diagonal_causal(dataset):
    b = epoch(dataset, shuffle=False)[0]
    pos, mask = b["position_ids"][0], b["attention_mask"][0, 0]
    segment = (pos == 0).cumsum(0)
    allowed = (segment[:, None] == segment[None, :]) & torch.ones_like(mask, dtype=torch.bool).tril()
    assert torch.equal(mask == 0, allowed)
    assert (mask[~allowed] == torch.finfo(torch.float32).min).all()
    assert (segment.max() > 1).item(), "the first row packs several samples"


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ(dataset):
    for packing in (False, True):
        a, b = epoch(dataset, packing=packing), epoch(dataset, packing=packing)
        assert len(a) == len(b)
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
        order = samples_in(a)
        assert order != samples_in(epoch(dataset, packing=packing, epoch=1))
        assert order != samples_in(epoch(dataset, packing=packing, seed=1))
        assert sorted(order) == sorted(samples_in(epoch(dataset, packing=packing, epoch=1)))
    unshuffled = samples_in(epoch(dataset, packing=False, shuffle=False, seed=5, epoch=3))
    assert unshuffled == [tuple(x) for x in dataset["input_ids"][:]]


def test_pack_rows_best_fit_decreasing():
    rows = pack_rows(np.array([5, 3, 7, 2, 3]), 10)
    assert rows == [[2, 1], [0, 4, 3]]
    lengths = np.random.default_rng(0).integers(1, 512, size=5000)
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(5000))
    assert max(lengths[row].sum() for row in rows) <= 512
    assert len(rows) <= 1.02 * lengths.sum() / 512 + 1


def test_start_batch_resumes_mid_epoch(dataset):
    for packing in (False, True):
        full = epoch(dataset, packing=packing, epoch=2)
        tail = epoch(dataset, packing=packing, epoch=2, start_batch=4)
        assert len(tail) == len(full) - 4
        assert all(torch.equal(x[k], y[k]) for x, y in zip(full[4:], tail) for k in x)


def test_works_on_a_selected_subset(dataset):
    subset = dataset.select([5, 0, 17])
    (batch,) = epoch(subset, packing=False, shuffle=False)
    assert batch["input_ids"][0, : subset[0]["length"]].tolist() == dataset[5]["input_ids"]
    assert batches_per_epoch(subset, batch_size=3, max_seq_len=MAX_LEN, packing=False) == 1


def test_bad_arguments_are_refused(dataset):
    with pytest.raises(InputError, match="longer than max_seq_len 32; tokenize it with the same max_seq_len"):
        epoch(dataset, max_seq_len=32)
    with pytest.raises(InputError, match="batch_size must be positive"):
        batches_per_epoch(dataset, batch_size=0, max_seq_len=MAX_LEN, packing=True)
    with pytest.raises(InputError, match="must be non-negative"):
        epoch(dataset, seed=-1)


def per_token_losses(model, batches, **forward_kwargs) -> dict[tuple[int, ...], torch.Tensor]:
    """Per supervised token cross-entropy of each sample, found by its tokens in the batch."""
    out = {}
    with torch.no_grad():
        for b in batches:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}, **forward_kwargs).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=-100, reduction="none"
            )
            sample_ids = samples_in([b])
            k = 0
            for r in range(b["input_ids"].shape[0]):
                if "position_ids" in b:
                    pos = b["position_ids"][r].tolist()
                    starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
                    spans = [(s, e) for s, e in zip(starts, starts[1:]) if (b["labels"][r, s:e] != -100).any()]
                else:
                    spans = [(0, int(b["attention_mask"][r].sum()))]
                for s, e in spans:
                    # token t (s < t < e) is predicted at t - 1; labels[s] is always -100.
                    supervised = b["labels"][r, s + 1 : e] != -100
                    out[sample_ids[k]] = loss[r, s : e - 1][supervised]
                    k += 1
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_give_the_same_per_token_loss(make_base, dataset, arch, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_base(arch=arch), attn_implementation=attn).eval()
    assert model.config.use_cache  # the default: transformers would skip its own packed detection
    unpacked = per_token_losses(model, epoch(dataset, packing=False, batch_size=29))
    packed_batches = epoch(dataset, packing=True, batch_size=29)
    packed = per_token_losses(model, packed_batches)
    assert sorted(unpacked) == sorted(packed) and len(packed) == 29
    worst = max((unpacked[s] - packed[s]).abs().max().item() for s in packed)
    assert worst < 1e-5, worst
    total = sum(int((b["labels"] != -100).sum()) for b in packed_batches)
    assert sum(len(v) for v in packed.values()) == total

    # The 4D mask is what keeps samples apart: with position_ids alone and the default
    # use_cache=True, transformers skips its packed-sequence detection and samples leak.
    leaky = [{k: v for k, v in b.items() if k != "attention_mask"} for b in packed_batches]
    leaked = per_token_losses(model, leaky)
    assert max((unpacked[s] - leaked[s]).abs().max().item() for s in leaked) > 1e-2
    # With use_cache=False transformers detects the packing from position_ids and is exact too
    # (the on-device alternative for long rows: drop attention_mask, pass use_cache=False).
    detected = per_token_losses(model, leaky, use_cache=False)
    assert max((unpacked[s] - detected[s]).abs().max().item() for s in detected) < 1e-5

    # The decoder backbone takes the same batch and gives the same hidden states per sample.
    b = packed_batches[0]
    hidden = model.base_model(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state
    pos = b["position_ids"][0]
    n = int(torch.nonzero(pos == 0)[1]) if (pos == 0).sum() > 1 else pos.numel()
    alone = model.base_model(input_ids=b["input_ids"][:1, :n]).last_hidden_state
    assert torch.allclose(hidden[:1, :n], alone, atol=1e-5)


def test_packed_training_step_matches_unpacked_gradients(make_base, dataset):
    """Loss summed over supervised tokens: the same gradients from packed and unpacked batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_base(arch="llama")).train()

    def grads(batches):
        model.zero_grad()
        for b in batches:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g_unpacked = grads(epoch(dataset, packing=False, batch_size=29))
    g_packed = grads(epoch(dataset, packing=True, batch_size=29))
    assert torch.allclose(g_unpacked, g_packed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bfloat16_model_with_bfloat16_mask(make_base, dataset, attn):
    """Half precision: the mask in the model's dtype is accepted and keeps samples apart."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_base(arch="llama", dtype="bfloat16"), attn_implementation=attn).eval()
    subset = dataset.select(range(9))  # bf16 matmuls are slow on CPUs
    packed_batches = epoch(subset, packing=True, batch_size=9, mask_dtype=torch.bfloat16)
    assert packed_batches[0]["attention_mask"].dtype == torch.bfloat16
    packed = per_token_losses(model, packed_batches)
    unpacked = per_token_losses(model, epoch(subset, packing=False, batch_size=9))
    # bf16 keeps ~3 significant digits; different matmul shapes round differently.
    worst = max((unpacked[s].float() - packed[s].float()).abs().max().item() for s in packed)
    assert worst < 0.1, worst
    leaky = [{k: v for k, v in b.items() if k != "attention_mask"} for b in packed_batches]
    leaked = per_token_losses(model, leaky)
    assert max((unpacked[s].float() - leaked[s].float()).abs().max().item() for s in leaked) > 0.5
