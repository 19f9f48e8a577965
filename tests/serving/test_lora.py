"""The batched LoRA computation (`serving.lora`) against a per-token loop of the LoRA formula."""

from __future__ import annotations

import torch

from serving.lora import MIN_SEGMENT_TOKENS, LoraBatch, add_embedding_lora, torch_add_lora

SLOTS, RANK = 6, 4


def _stacks(d_in: int, sizes: list[int], generator):
    """Random per-slot factors A_p,s [r_s, d_in] and sB_p,s [d_out, r_s] (ranks below RANK), slot 0 empty,
    and the same packed into the stacked layout of `serving.lora`."""
    parts = len(sizes)
    a_t = torch.zeros(d_in, SLOTS * parts * RANK)
    b_ts = [torch.zeros(SLOTS * RANK, size) for size in sizes]
    factors = {}
    for slot in range(1, SLOTS):
        rank = 1 + slot % RANK
        for p, size in enumerate(sizes):
            a = torch.randn(rank, d_in, generator=generator)
            b = torch.randn(size, rank, generator=generator)
            factors[slot, p] = (a, b)
            col = slot * parts * RANK + p * RANK
            a_t[:, col:col + rank] = a.t()
            b_ts[p][slot * RANK:slot * RANK + rank] = b.t()
    return a_t, b_ts, factors


def _slots_for_test() -> list[int]:
    # decodes (one token each, mixed slots and the base), then prompts of one slot each
    return [3, 0, 5, 5, 1, 2] + [2] * 10 + [0] * 9 + [4] * MIN_SEGMENT_TOKENS + [1] * 3


def test_plan_splits_prompts_into_segments_and_the_rest_into_one_dense_range():
    plan = LoraBatch.build(_slots_for_test(), torch.device("cpu"), torch.float32)
    assert plan.segments == [(2, 5, 16), (4, 25, 33)]  # the last decode joins the run of its slot
    assert (plan.dense.start, plan.dense.end, plan.dense.hi) == (0, 36, 6)
    mask = plan.dense.mask
    assert mask.shape == (36, 5)
    assert mask[0].tolist() == [0, 0, 1, 0, 0] and mask[1].sum() == 0 and mask[4].tolist() == [1, 0, 0, 0, 0]
    assert mask[5:33].sum() == 0  # segment and base tokens take nothing from the dense path
    assert mask[33:].argmax(1).tolist() == [0, 0, 0]
    assert not LoraBatch.build([0, 0, 0], torch.device("cpu"), torch.float32).active


def test_add_lora_matches_the_per_token_formula():
    generator = torch.Generator().manual_seed(0)
    d_in, sizes = 24, [16, 8, 8]
    a_t, b_ts, factors = _stacks(d_in, sizes, generator)
    slots = _slots_for_test()
    x = torch.randn(len(slots), d_in, generator=generator)
    base = [torch.randn(len(slots), size, generator=generator) for size in sizes]
    ys = [y.clone() for y in base]
    torch_add_lora(ys, x, a_t, b_ts, LoraBatch.build(slots, x.device, x.dtype), RANK)
    for t, slot in enumerate(slots):
        for p in range(len(sizes)):
            expected = base[p][t] if slot == 0 else base[p][t] + (x[t] @ factors[slot, p][0].t()) @ factors[slot, p][1].t()
            if slot == 0:
                assert torch.equal(ys[p][t], expected), "base tokens must be left exactly as they were"
            else:
                torch.testing.assert_close(ys[p][t], expected, rtol=1e-5, atol=1e-4)


def test_embedding_lora_gathers_each_tokens_row():
    generator = torch.Generator().manual_seed(1)
    vocab, dim = 30, 12
    a_emb = torch.zeros(SLOTS, vocab, RANK)
    b_t = torch.zeros(SLOTS * RANK, dim)
    factors = {}
    for slot in range(1, SLOTS):
        a, b = torch.randn(RANK, vocab, generator=generator), torch.randn(dim, RANK, generator=generator)
        factors[slot] = (a, b)
        a_emb[slot] = a.t()
        b_t[slot * RANK:(slot + 1) * RANK] = b.t()
    slots = _slots_for_test()
    tokens = torch.randint(0, vocab, (len(slots),), generator=generator)
    base = torch.randn(len(slots), dim, generator=generator)
    y = base.clone()
    add_embedding_lora(y, tokens, a_emb, b_t, LoraBatch.build(slots, y.device, y.dtype), RANK)
    for t, slot in enumerate(slots):
        if slot == 0:
            assert torch.equal(y[t], base[t])
        else:
            a, b = factors[slot]
            torch.testing.assert_close(y[t], base[t] + a[:, tokens[t]] @ b.t(), rtol=1e-5, atol=1e-4)
