"""The per-tensor LoRA math: `ΔW = s · B A`, laid out like the base tensor.

`B ∈ R^{d_out×r}`, `A ∈ R^{r×d_in}` (embeddings: `A ∈ R^{r×V}`, `B ∈ R^{d×r}`). A base
`nn.Linear` weight is `[d_out, d_in]` and receives `s · B A`; a `Conv1D` weight `[d_in, d_out]`
and an embedding `[V, d]` receive `(s · B A)ᵀ`.

The product is formed in float64 and rounded once to float32: every element is the float32
nearest to `s · Σ_k B_ik A_kj`, whatever BLAS, thread count or row block computed it. Rows can
therefore be produced in blocks (memory bounded by the block) with results identical to the
whole tensor at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapters.peft_format import LoraBinding
from merge.tensorio import read_float32


@dataclass(frozen=True)
class LoraDelta:
    """A bound LoRA module with its factors loaded (float64 copies of the stored values)."""

    a: np.ndarray  # [r, cols of B A]
    b: np.ndarray  # [rows of B A, r]
    scale: float
    transposed: bool  # base tensor stores (B A)ᵀ

    @classmethod
    def load(cls, binding: LoraBinding) -> "LoraDelta":
        a = read_float32(binding.lora.a).astype(np.float64)
        b = read_float32(binding.lora.b).astype(np.float64)
        return cls(a, b, binding.lora.scale, binding.transposed)

    def rows(self, first: int, last: int) -> np.ndarray:
        """Rows `[first, last)` of the delta in the base tensor's layout, float32."""
        if self.transposed:
            block = (self.b @ self.a[:, first:last]).T
        else:
            block = self.b[first:last] @ self.a
        block *= self.scale
        return block.astype(np.float32)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """`(s·B, A)` in PEFT's orientation (`B A` is [d_out, d_in], embeddings [d, V]), float64."""
        return self.b * self.scale, self.a
