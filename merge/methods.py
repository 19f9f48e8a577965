"""How several adapters' deltas combine into one: a registry of small method classes.

Every method takes the task deltas `Δᵢ` of one base tensor (float32, the tensor's layout) and
their weights `wᵢ`, and returns the combined delta `Δ`; the merge writes `W + Δ`.

- `linear`      `Δ = Σ wᵢ Δᵢ` (task arithmetic). Element-wise, so it runs on row blocks.
- `ties`        TIES-Merging (Yadav et al., arXiv 2306.01708) on the weighted task vectors
                `τᵢ = wᵢ Δᵢ`: trim each to its `density` fraction of largest magnitudes (entries
                tied at the threshold are all kept), elect the sign `γ = sgn(Σ τ̂ᵢ)` (0 counts
                as +), disjoint mean `Δ = Σ_{i∈A} τ̂ᵢ / |A|` over `A = {i : τ̂ᵢ ≠ 0, sgn τ̂ᵢ = γ}`.
                Weights apply before the election, as in mergekit (PEFT's `ties` elects from the
                unweighted vectors); with equal positive weights the two agree.
- `dare_linear` DARE (Yu et al., arXiv 2311.03099): drop each entry of `Δᵢ` with probability
                `p` and rescale the survivors by `1/(1-p)`, then `linear`.
- `dare_ties`   DARE's drop-and-rescale in place of TIES' trim, then TIES' sign election and
                disjoint mean.
- `svd`         `linear`, then re-factored into one LoRA adapter of rank `rank` (the best
                rank-`rank` approximation of the combined delta, by SVD); writes a PEFT adapter.

DARE's masks are drawn from a generator seeded by `(seed, adapter index, tensor name)`, so a
merge is reproducible and independent of the order tensors are visited in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from adapters.errors import InputError


@dataclass(frozen=True)
class MergeMethod:
    """Base class: `combine(deltas, weights, tensor)` -> combined delta (may reuse the `deltas` arrays)."""

    name: ClassVar[str]
    elementwise: ClassVar[bool] = False  # may run on row blocks of a tensor
    exact: ClassVar[bool] = True  # the merged model equals the adapters applied unmerged
    writes_adapter: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()  # which of density, drop_rate, rank, seed apply

    def combine(self, deltas: list[np.ndarray], weights: list[float], tensor: str) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **{k: getattr(self, k) for k in self.options}}


def _weighted_sum(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """`Σ wᵢ Δᵢ` in float32, accumulated in place in `deltas[0]` (callers hand over their deltas)."""
    total = deltas[0]
    if weights[0] != 1.0:
        total *= np.float32(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:]):
        total += delta if weight == 1.0 else delta * np.float32(weight)
    return total


def _trim(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep the `int(density · n)` largest magnitudes (and any tied with the smallest kept)."""
    keep = int(density * delta.size)
    if keep >= delta.size:
        return delta
    if keep == 0:
        return np.zeros_like(delta)
    magnitude = np.abs(delta).ravel()
    threshold = np.partition(magnitude, delta.size - keep)[delta.size - keep]
    return np.where(np.abs(delta) >= threshold, delta, np.float32(0))


def _elect_and_mean(tasks: list[np.ndarray]) -> np.ndarray:
    """TIES' sign election and disjoint mean over (already trimmed, weighted) task vectors."""
    elected_positive = _weighted_sum([tasks[0].copy(), *tasks[1:]], [1.0] * len(tasks)) >= 0
    total = np.zeros_like(tasks[0])
    count = np.zeros(tasks[0].shape, dtype=np.float32)
    for task in tasks:
        agrees = np.where(elected_positive, task > 0, task < 0)
        total += np.where(agrees, task, np.float32(0))
        count += agrees
    return total / np.maximum(count, np.float32(1))


def _drop_and_rescale(delta: np.ndarray, drop_rate: float, seed: int, index: int, tensor: str) -> np.ndarray:
    key = int.from_bytes(hashlib.sha256(tensor.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, index, key])
    keep = rng.random(delta.shape, dtype=np.float32) >= drop_rate
    return np.where(keep, delta / np.float32(1 - drop_rate), np.float32(0))


@dataclass(frozen=True)
class Linear(MergeMethod):
    name: ClassVar[str] = "linear"
    elementwise: ClassVar[bool] = True

    def combine(self, deltas, weights, tensor):
        return _weighted_sum(deltas, weights)


@dataclass(frozen=True)
class Ties(MergeMethod):
    name: ClassVar[str] = "ties"
    exact: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ("density",)
    density: float = 0.2

    def combine(self, deltas, weights, tensor):
        return _elect_and_mean([_trim(d * np.float32(w), self.density) for d, w in zip(deltas, weights)])


@dataclass(frozen=True)
class DareLinear(MergeMethod):
    name: ClassVar[str] = "dare_linear"
    exact: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ("drop_rate", "seed")
    drop_rate: float = 0.9
    seed: int = 0

    def combine(self, deltas, weights, tensor):
        dropped = [_drop_and_rescale(d, self.drop_rate, self.seed, i, tensor) for i, d in enumerate(deltas)]
        return _weighted_sum(dropped, weights)


@dataclass(frozen=True)
class DareTies(MergeMethod):
    name: ClassVar[str] = "dare_ties"
    exact: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ("drop_rate", "seed")
    drop_rate: float = 0.9
    seed: int = 0

    def combine(self, deltas, weights, tensor):
        dropped = [_drop_and_rescale(d, self.drop_rate, self.seed, i, tensor) * np.float32(w)
                   for i, (d, w) in enumerate(zip(deltas, weights))]
        return _elect_and_mean(dropped)


@dataclass(frozen=True)
class Svd(MergeMethod):
    """`linear`, re-factored: `Σ wᵢ sᵢ Bᵢ Aᵢ ≈ B' A'` with `B' = U_k √S_k`, `A' = √S_k V_kᵀ`.

    The combined delta is `B_cat A_cat` with `B_cat = [w₁s₁B₁ | w₂s₂B₂ | …]` (d_out × R) and
    `A_cat = [A₁; A₂; …]` (R × d_in), so its SVD comes from two thin QRs and the SVD of an
    R × R core — never a d_out × d_in matrix. Ranks below `rank` are padded with zeros.
    """

    name: ClassVar[str] = "svd"
    writes_adapter: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ("rank",)
    rank: int = 0

    def combine(self, deltas, weights, tensor):
        return _weighted_sum(deltas, weights)

    def factor(self, factors: list[tuple[np.ndarray, np.ndarray]], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """`[(sᵢBᵢ, Aᵢ)]` (float64) -> `(B' [d_out, rank], A' [rank, d_in])` (float32)."""
        b_cat = np.concatenate([b * w for (b, _), w in zip(factors, weights)], axis=1)
        a_cat = np.concatenate([a for _, a in factors], axis=0)
        q_b, r_b = np.linalg.qr(b_cat)
        q_a, r_a = np.linalg.qr(a_cat.T)
        u, s, vt = np.linalg.svd(r_b @ r_a.T)
        k = min(self.rank, s.size)
        root = np.sqrt(s[:k])
        b_new = np.zeros((b_cat.shape[0], self.rank))
        a_new = np.zeros((self.rank, a_cat.shape[1]))
        b_new[:, :k] = (q_b @ u[:, :k]) * root
        a_new[:k] = root[:, None] * (vt[:k] @ q_a.T)
        return b_new.astype(np.float32), a_new.astype(np.float32)


METHODS: dict[str, type[MergeMethod]] = {m.name: m for m in (Linear, Ties, DareLinear, DareTies, Svd)}


def make_method(name: str, *, density: float | None = None, drop_rate: float | None = None,
                rank: int | None = None, seed: int = 0) -> MergeMethod:
    """Build a method from CLI/API options; refuses options the method does not use, and bad values."""
    if name not in METHODS:
        raise InputError(f"unknown merge method {name!r}; expected one of {', '.join(METHODS)}", param="method")
    cls = METHODS[name]
    given = {"density": density, "drop_rate": drop_rate, "rank": rank}
    for option, value in given.items():
        if value is not None and option not in cls.options:
            raise InputError(f"--{option.replace('_', '-')} does not apply to method {name}", param=option)
    kwargs = {k: v for k, v in given.items() if v is not None}
    if "seed" in cls.options:
        kwargs["seed"] = int(seed)
    if density is not None and not 0 < density <= 1:
        raise InputError(f"--density must be in (0, 1], got {density}", param="density")
    if drop_rate is not None and not 0 <= drop_rate < 1:
        raise InputError(f"--drop-rate must be in [0, 1), got {drop_rate}", param="drop_rate")
    if name == "svd" and (rank is None or rank < 1):
        raise InputError("method svd needs --rank, a positive integer", param="rank")
    return cls(**kwargs)
