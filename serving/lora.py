"""Batched LoRA: every token adds the delta of its own adapter slot.

For P outputs sharing one input x (q|k|v, gate|up, or a single projection), slot σ(t) of token t:

    y_p[t] += (x[t] A_p,σ(t)ᵀ) (s_σ(t) B_p,σ(t))ᵀ        A_p,s: [r, d_in], B_p,s: [d_out_p, r]

Stacks, ranks zero-padded to r = max_lora_rank and the scale folded into B:

    a_t      [d_in, S·P·r]     column s·P·r + p·r + j holds A_p,s[j]ᵀ (slot-major, so slots 1..hi-1
                               are one contiguous column range)
    b_ts[p]  [S·r, d_out_p]    rows s·r .. s·r+r-1 hold (s_s B_p,s)ᵀ

`add_lora` is the one function a fused kernel (Punica/SGMV on CUDA) replaces: `lora_kernel(device)`
picks the implementation per device type, vLLM lora/ style; the torch version runs everywhere.
It follows a `LoraBatch`, built once per step from the per-token slot index:

- segments: runs of at least `MIN_SEGMENT_TOKENS` tokens of one slot (a prompt), each two GEMMs
  against that slot's columns and rows (SGMV-like);
- dense: the other tokens (decodes, one per sequence) in one range: one GEMM against the columns of
  slots 1..hi-1, a one-hot slot mask, one GEMM back (BGMV-like without gathering weights). Its cost
  grows with the highest slot in use, which the slot table keeps low.

Slot 0 (the base model) is all zeros and never read: base tokens get exactly nothing added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MIN_SEGMENT_TOKENS = 8


@dataclass
class DensePlan:
    start: int
    end: int
    mask: torch.Tensor  # [end - start, hi - 1]: one-hot slot of each token (all zero: base or segment token)
    hi: int  # one past the highest slot among the dense tokens


@dataclass
class LoraBatch:
    """What the LoRA layers of one step need, derived from the per-token slot index `slots` [T]."""

    slots: torch.Tensor  # [T] long, on the model's device
    dense: DensePlan | None
    segments: list[tuple[int, int, int]]  # (slot, start, end)
    dtype: torch.dtype

    @property
    def active(self) -> bool:
        return self.dense is not None or bool(self.segments)

    @classmethod
    def build(cls, slots: list[int], device: torch.device, dtype: torch.dtype) -> LoraBatch:
        segments: list[tuple[int, int, int]] = []
        dense_tokens: list[int] = []
        start = 0
        for t in range(1, len(slots) + 1):
            if t < len(slots) and slots[t] == slots[start]:
                continue
            slot = slots[start]
            if slot != 0:
                if t - start >= MIN_SEGMENT_TOKENS:
                    segments.append((slot, start, t))
                else:
                    dense_tokens.extend(range(start, t))
            start = t
        dense = None
        if dense_tokens:
            lo, hi_token = dense_tokens[0], dense_tokens[-1] + 1
            hi = max(slots[t] for t in dense_tokens) + 1
            rows = torch.tensor([t - lo for t in dense_tokens])
            cols = torch.tensor([slots[t] - 1 for t in dense_tokens])
            mask = torch.zeros(hi_token - lo, hi - 1, dtype=dtype)
            mask[rows, cols] = 1
            dense = DensePlan(lo, hi_token, mask.to(device), hi)
        return cls(torch.tensor(slots, dtype=torch.long, device=device), dense, segments, dtype)


def _expand(ys: list[torch.Tensor], h_dense: torch.Tensor | None, h_segments: list[torch.Tensor],
            b_ts: list[torch.Tensor], batch: LoraBatch, rank: int) -> None:
    """ys[p] += h B_pᵀ. `h_dense`: [n, hi-1, P, r] (already masked); `h_segments[i]`: [len, P·r]."""
    r = rank
    if batch.dense is not None:
        d = batch.dense
        n, width = d.end - d.start, (d.hi - 1) * r
        for p, (y, b_t) in enumerate(zip(ys, b_ts)):
            y[d.start:d.end].addmm_(h_dense[:, :, p].reshape(n, width), b_t[r:d.hi * r])
    for (slot, start, end), h in zip(batch.segments, h_segments):
        for p, (y, b_t) in enumerate(zip(ys, b_ts)):
            y[start:end].addmm_(h[:, p * r:(p + 1) * r], b_t[slot * r:(slot + 1) * r])


def torch_add_lora(ys: list[torch.Tensor], x: torch.Tensor, a_t: torch.Tensor, b_ts: list[torch.Tensor],
                   batch: LoraBatch, rank: int) -> None:
    """ys[p] += the LoRA delta of each token's slot, in place. x: [T, d_in], ys[p]: [T, d_out_p]."""
    parts, r = len(b_ts), rank
    h_dense = None
    if batch.dense is not None:
        d = batch.dense
        h_dense = torch.mm(x[d.start:d.end], a_t[:, parts * r:d.hi * parts * r]).view(d.end - d.start, d.hi - 1, parts, r)
        h_dense.mul_(d.mask[:, :, None, None])
    width = parts * r
    h_segments = [torch.mm(x[start:end], a_t[:, slot * width:(slot + 1) * width]) for slot, start, end in batch.segments]
    _expand(ys, h_dense, h_segments, b_ts, batch, rank)


def add_embedding_lora(y: torch.Tensor, tokens: torch.Tensor, a_emb: torch.Tensor, b_t: torch.Tensor,
                       batch: LoraBatch, rank: int) -> None:
    """LoRA on an embedding, in place: y[t] += A_σ(t)ᵀ[token_t] (s B_σ(t))ᵀ.

    a_emb [S, V, r]: each slot's Aᵀ, gathered per token; b_t [S·r, d] as for `add_lora`.
    """
    h = a_emb[batch.slots, tokens]  # [T, r]
    h_dense = None
    if batch.dense is not None:
        d = batch.dense
        h_dense = (h[d.start:d.end, None, :] * d.mask[:, :, None]).unsqueeze(2)  # [n, hi-1, 1, r]
    _expand([y], h_dense, [h[start:end] for _, start, end in batch.segments], [b_t], batch, rank)


LoraKernel = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor, list[torch.Tensor], LoraBatch, int], None]
_KERNELS: dict[str, LoraKernel] = {}


def register_lora_kernel(device_type: str, kernel: LoraKernel) -> None:
    """Use `kernel` instead of `torch_add_lora` on devices of `device_type` (e.g. a fused CUDA kernel)."""
    _KERNELS[device_type] = kernel


def lora_kernel(device: torch.device) -> LoraKernel:
    """The `add_lora` implementation for a device: a registered kernel, else the torch version."""
    return _KERNELS.get(device.type, torch_add_lora)
