"""The per-tensor LoRA math: `ΔW = s · B A`, laid out like the base tensor.

`B ∈ R^{d_out×r}`, `A ∈ R^{r×d_in}` (embeddings: `A ∈ R^{r×V}`, `B ∈ R^{d×r}`). A base
`nn.Linear` weight is `[d_out, d_in]` and receives `s · B A`; a `Conv1D` weight `[d_in, d_out]`
and an embedding `[V, d]` receive `(s · B A)ᵀ = Aᵀ (s · B)ᵀ`. Either way the stored delta is
`left @ right` with `left` holding one row per base row, so any block of base rows is one
small matrix product (`left[rows] @ right`) and memory is bounded by the block.

Arithmetic is float32 (as PEFT's on CPU): `s · B` is formed first (exact when `s` is a power of
two, as `alpha / r` usually is), then one float32 matrix product. The float32 delta can differ
from another BLAS's by an ulp; results are deterministic for a given numpy build and shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapters.peft_format import LoraBinding
from merge.tensorio import read_float32


@dataclass(frozen=True)
class LoraDelta:
    """A bound LoRA module with its factors loaded, oriented so that `ΔW_stored = left @ right`."""

    left: np.ndarray  # [base rows, r] float32, C-contiguous
    right: np.ndarray  # [r, base cols] float32, C-contiguous

    @classmethod
    def load(cls, binding: LoraBinding) -> "LoraDelta":
        a = read_float32(binding.lora.a)
        b_scaled = read_float32(binding.lora.b) * np.float32(binding.lora.scale)
        if binding.transposed:
            return cls(np.ascontiguousarray(a.T), np.ascontiguousarray(b_scaled.T))
        return cls(np.ascontiguousarray(b_scaled), a)

    def rows(self, first: int, last: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `[first, last)` of the delta in the base tensor's layout, float32."""
        return np.matmul(self.left[first:last], self.right, out=out)

    def factors(self, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
        """`(s·B, A)` in PEFT's orientation (`B A` is [d_out, d_in], embeddings [d, V]), float64."""
        if transposed:
            return self.right.T.astype(np.float64), self.left.T.astype(np.float64)
        return self.left.astype(np.float64), self.right.astype(np.float64)
