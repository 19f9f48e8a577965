"""Language-model loss without materialising `[batch, seq, vocab]` logits.

For hidden states `h ∈ R^{N×H}` at supervised positions, head weight `W ∈ R^{V×H}` and targets
`y ∈ [0, V)^N`:

    z = h Wᵀ                      (optionally z ← c · tanh(z / c), Gemma-style soft-capping)
    loss = Σ_n  logsumexp(z_n) − z_n[y_n]
    ∂loss/∂z = softmax(z) − onehot(y)        ∂loss/∂h = (∂loss/∂z) W

`fused_linear_cross_entropy` does this chunk by chunk and computes `∂loss/∂h` during the forward
pass, so only one chunk's `[chunk, V]` logits ever exist and nothing is recomputed: the same
matmuls as a plain `lm_head` + `cross_entropy`, without the vocabulary-sized activations and their
gradients. It serves the common case, a frozen bias-free `nn.Linear` head. Any other head (LoRA on
`lm_head`, a bias) goes through `checkpointed_cross_entropy`, which recomputes each chunk's logits
in backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int, softcap: float | None):
        grad_h = torch.empty_like(h)
        acc = torch.promote_types(h.dtype, torch.float32)  # at least float32 for logits and sums
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, y.numel(), chunk):
            hs, ys = h[start:start + chunk], y[start:start + chunk]
            z = (hs @ weight.T).to(acc)
            if softcap:
                t = torch.tanh(z / softcap)
                z = t * softcap
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, ys[:, None]).squeeze(1)).sum()
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place of z
            g[torch.arange(ys.numel(), device=g.device), ys] -= 1.0
            if softcap:
                g *= 1.0 - t * t
            grad_h[start:start + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, *,
                               chunk: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """Σ cross-entropy of `h Wᵀ` against `y` (h: [N,H], W: [V,H] frozen, y: [N]) -> scalar, >= float32."""
    return _FusedLinearCrossEntropy.apply(h, weight, y, chunk, softcap)


def checkpointed_cross_entropy(h: torch.Tensor, head: torch.nn.Module, y: torch.Tensor, *,
                               chunk: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """Σ cross-entropy of `head(h)` against `y`, each chunk's logits recomputed in backward."""

    def chunk_loss(hs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        z = head(hs).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        return torch.nn.functional.cross_entropy(z, ys, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        total = total + checkpoint(chunk_loss, h[start:start + chunk], y[start:start + chunk], use_reentrant=False)
    return total


class CausalLMLoss:
    """Summed next-token loss from backbone hidden states.

    hidden: [B, T, H]; labels: [B, T], -100 where no loss. Position t predicts labels[t+1];
    only supervised positions reach the head.
    """

    def __init__(self, head: torch.nn.Module, chunk_tokens: int = 1024, softcap: float | None = None):
        self.head, self.chunk, self.softcap = head, chunk_tokens, softcap
        self.fused = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
        keep = y != IGNORE_INDEX
        h, y = h[keep], y[keep]
        if self.fused:
            return fused_linear_cross_entropy(h, self.head.weight, y, chunk=self.chunk, softcap=self.softcap)
        return checkpointed_cross_entropy(h, self.head, y, chunk=self.chunk, softcap=self.softcap)
