"""The per-row static KV cache.

`k`, `v`: [layers, rows, kv_heads, max_len, head_dim]. Running sequence i owns row i, so the rows in use
are always `0..B-1` and decode attention reads the views `k[l, :B, :, :n]` without gathering. When a
sequence leaves, the last row moves into its place (`move_row`), one copy over all layers.
Memory: 2 · layers · rows · kv_heads · max_len · head_dim · dtype bytes, allocated once.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows, self.max_len = rows, max_len

    @staticmethod
    def bytes_needed(layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * rows * kv_heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst`, in every layer."""
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])
