"""Layers whose tokens each carry an adapter slot: `Projection` (linear) and `Embedding`.

Both keep the base weight untouched and hold, per slot, the adapter's LoRA factors (see `serving.lora`
for the stacked layout) and optionally a full per-slot copy of the module (`modules_to_save`).
`set_slot` / `clear_slot` are called between steps by the adapter cache; `forward` by the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.lora import LoraBatch, add_embedding_lora, lora_kernel


DECODE_KERNELS = ("mm", "nt", "packed")  # see `BaseMatmul`
_KEEP_MM_WITHIN = 0.95  # another kernel must take < 95% of "mm"'s time to replace it: noise must not flip the choice
_chosen: dict[tuple[int, int, int, int], str] = {}  # (d_in, d_out, rows, threads) -> kernel, measured once per process


class BaseMatmul:
    """`x Wᵀ + b` for a base weight; at the decode batch size (`rows`) on CPUs, the fastest of three kernels
    on this machine, measured at load.

    Decode multiplies `rows` (= `max_num_seqs` once the batch is full) tokens by every weight at every step:
    the one GEMM shape worth choosing a kernel for. The candidates compute the same float32 product:

    - "mm": `torch.mm(x, Wᵀ)` on the row-major `Wᵀ` [d_in, d_out] the engine stores (no extra memory);
    - "nt": `F.linear(x, W)` on a contiguous `W` [d_out, d_in] (BLAS's transposed-B kernel);
    - "packed": MKL's pre-packed SGEMM (`cblas_sgemm_pack`, through torch's `mkl::_mkl_linear`, the op
      Inductor uses for float32 CPU linears); MKL promises the packed layout only for the M it was packed for.

    Which one wins depends on the CPU. Measured on [16, 512] x [512, 2752]: on the serving issue's machine
    "packed" ran ~1.4x "mm" (1 thread); on an AMD EPYC (2 threads) "packed" was the slowest, and in the whole
    engine "nt" gave 1.12-1.15x the tokens/s of "packed" and ~1.07x that of "mm". So each (shape, rows, threads)
    is timed once per process (`_measure`: interleaved best-of rounds over weights read from memory, not cache;
    ~0.1 s a shape) and "mm" is kept unless another kernel is at least 5% faster. Only the winner's copy of W is kept (none for "mm"). Any other row count (prefills, a
    partly filled batch) and any other device or dtype takes "mm".
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, rows: int | None):
        self.weight_t, self.bias, self.rows = weight_t, bias, rows
        self.kernel, self.w = "mm", None
        if rows and weight_t.device.type == "cpu" and weight_t.dtype == torch.float32:
            self.kernel = decode_kernel(*weight_t.shape, rows)
            if self.kernel == "nt":
                self.w = weight_t.t().contiguous()
            elif self.kernel == "packed":
                self.w = torch.ops.mkl._mkl_reorder_linear_weight(weight_t.t().contiguous(), rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w is not None and x.shape[0] == self.rows:
            return _run(self.kernel, x, self.weight_t, self.w, self.bias, self.rows)
        return _run("mm", x, self.weight_t, None, self.bias, self.rows)


def _run(kernel: str, x: torch.Tensor, weight_t: torch.Tensor, w, bias: torch.Tensor | None, rows) -> torch.Tensor:
    """`x Wᵀ + b` by `kernel`; `w` is what that kernel reads (`W` for "nt", MKL's packed `W` for "packed")."""
    if kernel == "nt":
        return F.linear(x, w, bias)
    if kernel == "packed":
        return torch.ops.mkl._mkl_linear(x, w, weight_t.t(), bias, rows)
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def decode_kernel(d_in: int, d_out: int, rows: int) -> str:
    """The fastest of `DECODE_KERNELS` for [rows, d_in] x [d_in, d_out] in float32 on this CPU (see `BaseMatmul`)."""
    key = (d_in, d_out, rows, torch.get_num_threads())
    if key not in _chosen:
        _chosen[key] = _measure(d_in, d_out, rows)
    return _chosen[key]


def decode_kernels() -> dict[tuple[int, int, int, int], str]:
    """What `decode_kernel` chose so far in this process: (d_in, d_out, rows, threads) -> kernel."""
    return dict(_chosen)


def _measure(d_in: int, d_out: int, rows: int, rounds: int = 5, ring_bytes: int = 32 << 20) -> str:
    """Time each kernel over a ring of distinct random weights of this shape, about `ring_bytes` in all (at most
    16): in decode every weight is read once per step from beyond the caches, and a kernel timed on one hot weight
    ranks differently (on the AMD EPYC, "mm" beat "nt" hot and lost to it by ~7% in the engine). A weight above
    `ring_bytes` is timed on its first `ring_bytes` of columns: what is allocated here stays bounded for any base."""
    import time

    d_out = min(d_out, max(1, ring_bytes // (4 * d_in)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=gen)
    ring = [torch.randn(d_in, d_out, generator=gen) for _ in range(min(16, max(1, ring_bytes // (4 * d_in * d_out))))]
    operands = {"mm": [None] * len(ring), "nt": [w_t.t().contiguous() for w_t in ring]}
    if torch.backends.mkl.is_available():
        operands["packed"] = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in operands["nt"]]
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(rounds):
        for kernel, ws in operands.items():
            _run(kernel, x, ring[0], ws[0], None, rows)  # this kernel's code warm, its weights not
            start = time.perf_counter()
            for w_t, w in zip(ring, ws):
                _run(kernel, x, w_t, w, None, rows)
            best[kernel] = min(best[kernel], time.perf_counter() - start)
    fastest = min(best, key=best.get)
    return fastest if best[fastest] < _KEEP_MM_WITHIN * best["mm"] else "mm"


class Projection:
    """P outputs sharing one input: `y = x Wᵀ + b`, split into parts (q|k|v), each with batched LoRA.

    `weight_t` [d_in, Σ d_out_p] is `Wᵀ`, stored row-major (GPT-2's Conv1D layout). `parts` names the
    module each output is in the checkpoint (`model.layers.0.self_attn.q_proj`) and its width.
    The LoRA stacks of the head are allocated when an adapter first targets it (its width is the
    vocabulary); those of the layers up front.
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, parts: list[tuple[str, int]], *,
                 slots: int, rank: int, allocate: bool = True, pack_rows: int | None = None):
        self.weight_t, self.bias = weight_t, bias
        self.matmul = BaseMatmul(weight_t, bias, pack_rows)
        self.names = [name for name, _ in parts]
        self.sizes = [size for _, size in parts]
        self.slots, self.rank = slots, rank
        self.kernel = lora_kernel(weight_t.device)
        self.a_t: torch.Tensor | None = None
        self.b_ts: list[torch.Tensor] = []
        self.lora_slots: set[int] = set()  # slots holding LoRA factors for this projection
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # slot -> (weight_t, bias) copy
        if allocate:
            self._allocate()

    @property
    def d_in(self) -> int:
        return self.weight_t.shape[0]

    def _allocate(self) -> None:
        like = dict(dtype=self.weight_t.dtype, device=self.weight_t.device)
        self.a_t = torch.zeros(self.d_in, self.slots * len(self.sizes) * self.rank, **like)
        self.b_ts = [torch.zeros(self.slots * self.rank, size, **like) for size in self.sizes]

    def set_slot(self, slot: int, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write slot `slot`: `factors[p] = (A [r, d_in], sB [d_out_p, r])` for the parts it targets."""
        self.clear_slot(slot)
        if not factors:
            return
        if self.a_t is None:
            self._allocate()
        r, width = self.rank, len(self.sizes) * self.rank
        for p, (a, b) in factors.items():
            rank = a.shape[0]
            col = slot * width + p * r
            self.a_t[:, col:col + rank].copy_(a.t())
            self.b_ts[p][slot * r:slot * r + rank].copy_(b.t())
        self.lora_slots.add(slot)

    def set_saved(self, slot: int, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
        """A full copy of this (single-part) module for `slot`, replacing the base for its tokens."""
        self.clear_slot(slot)
        self.saved[slot] = (weight_t, bias)

    def clear_slot(self, slot: int) -> None:
        if slot in self.lora_slots:
            r, width = self.rank, len(self.sizes) * self.rank
            self.a_t[:, slot * width:(slot + 1) * width].zero_()
            for b_t in self.b_ts:
                b_t[slot * r:(slot + 1) * r].zero_()
            self.lora_slots.discard(slot)
        self.saved.pop(slot, None)

    def __call__(self, x: torch.Tensor, batch: LoraBatch) -> list[torch.Tensor]:
        """x [T, d_in] -> one [T, d_out_p] tensor per part."""
        y = self.matmul(x)
        ys = list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]
        if self.lora_slots and batch.active:
            self.kernel(ys, x, self.a_t, self.b_ts, batch, self.rank)
        for slot, (weight_t, bias) in self.saved.items():
            rows = (batch.slots == slot).nonzero().squeeze(1)
            if len(rows):
                xs = x[rows]
                y[rows] = torch.mm(xs, weight_t) if bias is None else torch.addmm(bias, xs, weight_t)
        return ys


class Embedding:
    """Token embedding `x = E[token]` with per-slot LoRA (`A` gathered per token) and saved copies."""

    def __init__(self, weight: torch.Tensor, name: str, *, slots: int, rank: int):
        self.weight, self.name = weight, name
        self.slots, self.rank = slots, rank
        self.a_emb: torch.Tensor | None = None  # [S, V, r]: each slot's Aᵀ
        self.b_t: torch.Tensor | None = None  # [S·r, d]
        self.lora_slots: set[int] = set()
        self.saved: dict[int, torch.Tensor] = {}

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """A [r, V] (PEFT's lora_embedding_A), sB [d, r]."""
        self.clear_slot(slot)
        if self.a_emb is None:
            like = dict(dtype=self.weight.dtype, device=self.weight.device)
            vocab, dim = self.weight.shape
            self.a_emb = torch.zeros(self.slots, vocab, self.rank, **like)
            self.b_t = torch.zeros(self.slots * self.rank, dim, **like)
        rank = a.shape[0]
        self.a_emb[slot, :, :rank].copy_(a.t())
        self.b_t[slot * self.rank:slot * self.rank + rank].copy_(b.t())
        self.lora_slots.add(slot)

    def set_saved(self, slot: int, weight: torch.Tensor) -> None:
        self.clear_slot(slot)
        self.saved[slot] = weight

    def clear_slot(self, slot: int) -> None:
        if slot in self.lora_slots:
            self.a_emb[slot].zero_()
            self.b_t[slot * self.rank:(slot + 1) * self.rank].zero_()
            self.lora_slots.discard(slot)
        self.saved.pop(slot, None)

    def __call__(self, tokens: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        x = F.embedding(tokens, self.weight)
        if self.lora_slots and batch.active:
            add_embedding_lora(x, tokens, self.a_emb, self.b_t, batch, self.rank)
        for slot, weight in self.saved.items():
            rows = (batch.slots == slot).nonzero().squeeze(1)
            if len(rows):
                x[rows] = F.embedding(tokens[rows], weight)
        return x
