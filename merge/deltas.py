"""The per-tensor LoRA math: `ΔW = s · B A`, laid out like the base tensor, the same bytes on every machine.

`B ∈ R^{d_out×r}`, `A ∈ R^{r×d_in}` (embeddings: `A ∈ R^{r×V}`, `B ∈ R^{d×r}`). A base
`nn.Linear` weight is `[d_out, d_in]` and receives `s · B A`; a `Conv1D` weight `[d_in, d_out]`
and an embedding `[V, d]` receive `(s · B A)ᵀ = Aᵀ (s · B)ᵀ`. Either way the stored delta is
`left @ right` with `left` holding one row per base row, so any block of base rows is one
small matrix product (`left[rows] @ right`) and memory is bounded by the block.

Why the product is exact. A float32 matrix product rounds every partial sum, and which partial
sums it forms depends on the BLAS kernel and the block shape, so a float32 delta differs between
machines and between block sizes by an ulp here and there, and with it the checkpoint's sha256.
Instead each row `i` of `left` is rounded once to a grid of spacing `g_i = 2^(e_i - β)`, where
`2^e_i` is the least power of two above the row's largest magnitude, and each column `j` of
`right` to `h_j = 2^(f_j - β)` likewise. Then `left_ik = m_ik g_i` and `right_kj = n_kj h_j` with
integers `|m|, |n| ≤ 2^β`, and every term of `Δ_ij = g_i h_j Σ_k m_ik n_kj` is a multiple of `g_i h_j`
no larger than `2^(2β) g_i h_j`. With `β = ⌊(53 - ⌈log₂ r⌉) / 2⌋` (24 for r ≤ 32) every partial
sum, in whatever order and grouping a float64 GEMM takes them, with or without FMA, is an integer
times `g_i h_j` below `2^53 g_i h_j`: exactly representable. So the float64 product is the exact
`Σ_k left_ik right_kj`, and rounding it once to float32 gives the same bits on any machine, for any
block shape. (Nothing underflows or overflows: for factors of float32 magnitude the grids stay
within 2^±200.)

What the grid costs: a factor entry moves by at most half a grid step, `2^-(β+1)` of 2^e_i, i.e.
at most 2^-24 of its row's (column's) largest magnitude for r ≤ 32; a float32 entry within a
factor 2^(β-24) of that largest stays exact. The delta then differs from the exact `s·B·A` by at
most `2^-24 (max_k|l_ik| Σ_k|r_kj| + Σ_k|l_ik| max_k|r_kj|)` plus its final rounding, the same
order as the rounding error of the float32 product PEFT computes, `r·2^-24 Σ_k|l_ik r_kj|`. The alternative, a correctly rounded float32 of the exact product (a float64
product plus an error bound deciding which elements sit too close to a rounding boundary, those
recomputed exactly), needs several extra passes over every block and a data-dependent slow path;
this grid needs one float64 product and one rounding pass, whatever the data.

`s` is applied in float64 before `B` is put on its grid (one rounding, exact when `s` is a power
of two, as `alpha / r` usually is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adapters.peft_format import LoraBinding
from merge.tensorio import read_float32

PRODUCT_ELEMENTS = 64 * 1024  # float64 elements per product call (512 KB): the product is rounded while in cache


def grid_bits(rank: int) -> int:
    """`β`: the bits each factor keeps so that sums of `rank` products of them are exact in float64."""
    return (53 - math.ceil(math.log2(max(rank, 1)))) // 2


def on_grid(x: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """`x` (float64) rounded to multiples of `2^(e - bits)`, `2^e` the least power of two above the largest
    magnitude along `axis` (per row for axis=1, per column for axis=0); exact divisions and products."""
    _, exponent = np.frexp(np.abs(x).max(axis=axis, keepdims=True))
    step = np.ldexp(1.0, exponent - bits)
    return np.ascontiguousarray(np.rint(x / step) * step)


@dataclass(frozen=True)
class LoraDelta:
    """A bound LoRA module with its factors on their grids, oriented so that `ΔW_stored = left @ right`."""

    left: np.ndarray  # [base rows, r] float64, C-contiguous, each row on its grid
    right: np.ndarray  # [r, base cols] float64, C-contiguous, each column on its grid

    @classmethod
    def load(cls, binding: LoraBinding) -> "LoraDelta":
        a, b_scaled = scaled_factors(binding)
        left, right = (a.T, b_scaled.T) if binding.transposed else (b_scaled, a)
        bits = grid_bits(binding.lora.rank)
        return cls(on_grid(left, 1, bits), on_grid(right, 0, bits))

    def rows(self, first: int, last: int, out: np.ndarray | None = None,
             scratch: np.ndarray | None = None) -> np.ndarray:
        """Rows `[first, last)` of the delta in the base tensor's layout, float32 (in `out` when given).

        `scratch`: float64 work space of at least `PRODUCT_ELEMENTS` (or one row) elements, reused across calls.
        """
        cols = self.right.shape[1]
        if out is None:
            out = np.empty((last - first, cols), dtype=np.float32)
        step = max(1, PRODUCT_ELEMENTS // cols)
        if scratch is None or scratch.size < min(step, last - first) * cols:
            scratch = np.empty(min(step, last - first) * cols)
        for start in range(first, last, step):
            stop = min(start + step, last)
            exact = np.matmul(self.left[start:stop], self.right, out=scratch[:(stop - start) * cols].reshape(-1, cols))
            np.copyto(out[start - first:stop - first], exact, casting="same_kind")  # the one rounding
        return out


def scaled_factors(binding: LoraBinding) -> tuple[np.ndarray, np.ndarray]:
    """`(A, s·B)` in float64, as PEFT orients them (`B A` is [d_out, d_in], embeddings [d, V])."""
    return read_float32(binding.lora.a).astype(np.float64), read_float32(binding.lora.b).astype(np.float64) * binding.lora.scale
