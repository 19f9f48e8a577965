"""The chunked LM losses equal plain `lm_head` + `cross_entropy`, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from adapters.lm_loss import CausalLMLoss, checkpointed_cross_entropy, fused_linear_cross_entropy


def _reference(h, weight, y, softcap=None):
    z = h @ weight.T
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return torch.nn.functional.cross_entropy(z, y, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_fused_matches_reference_value_and_gradient(softcap, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 40, (50,), generator=g)
    ours = fused_linear_cross_entropy(h, weight, y, chunk=chunk, softcap=softcap)
    (grad_ours,) = torch.autograd.grad(ours * 0.5, h)
    ref = _reference(h, weight, y, softcap)
    (grad_ref,) = torch.autograd.grad(ref * 0.5, h)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-6, atol=1e-8)


def test_checkpointed_path_trains_a_head_with_its_own_parameters():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=True)
    h = torch.randn(30, 16, requires_grad=True)
    y = torch.randint(0, 40, (30,))
    ours = checkpointed_cross_entropy(h, head, y, chunk=8)
    ours.backward()
    grads = (h.grad.clone(), head.weight.grad.clone())
    h.grad = None
    head.zero_grad()
    torch.nn.functional.cross_entropy(head(h), y, reduction="sum").backward()
    torch.testing.assert_close(grads[0], h.grad)
    torch.testing.assert_close(grads[1], head.weight.grad)


def test_causal_loss_shifts_and_skips_unsupervised_positions():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 10]])
    loss_fn = CausalLMLoss(head, chunk_tokens=2)
    assert loss_fn.fused
    logits = head(hidden)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss_fn(hidden, labels), expected)
    assert not CausalLMLoss(torch.nn.Linear(8, 11)).fused  # a bias or trainable head: checkpointed path
