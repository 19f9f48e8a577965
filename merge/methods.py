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

Each method class carries its flags (`elementwise`: may run on row blocks; `exact`: the output
equals the adapters applied unmerged; `writes_adapter`: the output is an adapter, not a
checkpoint; `uses_seed`) and declares its `parameters` (`merge.options.Parameter`: type, default,
range), which `from_options` checks; callers branch on the flags, never on a method's name.

All arithmetic is element-wise in float32 on deterministic deltas (see `merge.deltas`), so
every method's output is the same on every machine; `svd` is the exception, its factors come
from LAPACK. DARE's masks are drawn from a generator seeded by `(seed, adapter index, tensor
name)`, so a merge is reproducible and independent of the order tensors are visited in.

numpy is imported where the arithmetic runs, so the registry (names, flags, parameters) loads
without it: the CLI reads it at startup.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from adapters.errors import InputError
from merge.options import SEED, Parameter

if TYPE_CHECKING:
    import numpy as np

    from adapters.peft_format import AdapterInfo, BaseWeights, LoraBinding
    from merge.writer import FileRecord

DENSITY = Parameter("density", float, "fraction of each task vector's entries kept, by magnitude", default=0.2,
                    minimum=0, maximum=1, exclusive_minimum=True)
DROP_RATE = Parameter("drop_rate", float, "probability that an entry of a task vector is dropped",
                      default=0.9, minimum=0, maximum=1, exclusive_maximum=True)
RANK = Parameter("rank", int, "rank of the adapter written", minimum=1)


@dataclass(frozen=True)
class MergeMethod:
    """Base class: `combine(deltas, weights, tensor)` -> combined delta (may reuse the `deltas` arrays)."""

    name: ClassVar[str]
    elementwise: ClassVar[bool] = False  # may run on row blocks of a tensor
    exact: ClassVar[bool] = True  # the merged model equals the adapters applied unmerged
    writes_adapter: ClassVar[bool] = False  # writes one PEFT adapter (`write_adapter`), not a checkpoint
    uses_seed: ClassVar[bool] = False  # draws random numbers from the merge's seed
    parameters: ClassVar[tuple[Parameter, ...]] = ()

    @classmethod
    def from_options(cls, options: dict, seed: int = 0) -> "MergeMethod":
        """The method with `options` (name -> value; None = not given) checked against its parameters."""
        declared = {p.name: p for p in cls.parameters}
        values = {}
        for name, value in options.items():
            if value is None:
                continue
            if name not in declared:
                raise InputError(f"--{name.replace('_', '-')} does not apply to method {cls.name}", param=name)
            values[name] = declared[name].check(value)
        for p in cls.parameters:
            if p.name not in values and p.default is None:
                raise InputError(f"method {cls.name} needs {p.flag}, {'an integer' if p.type is int else 'a number'} "
                                 f"{p.range_text()}", param=p.name)
        if cls.uses_seed:
            values["seed"] = seed
        return cls(**values)

    @classmethod
    def describe_class(cls) -> dict:
        """The method's flags and parameters as plain data (see `merge.options.describe`)."""
        return {"description": (cls.__doc__ or "").strip().splitlines()[0],
                "parameters": {p.name: p.describe() for p in cls.parameters},
                "required": [p.name for p in cls.parameters if p.default is None],
                "writes_adapter": cls.writes_adapter, "exact": cls.exact, "elementwise": cls.elementwise,
                "uses_seed": cls.uses_seed}

    def combine(self, deltas: list[np.ndarray], weights: list[float], tensor: str) -> np.ndarray:
        raise NotImplementedError

    def exact_for(self, ranks: list[int]) -> bool:
        """Whether the output equals the unmerged adapters, given the adapters' ranks."""
        return self.exact

    def describe(self) -> dict:
        """Name and option values, as the manifest records them."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


def _weighted_sum(deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """`Σ wᵢ Δᵢ` in float32, accumulated in place in `deltas[0]` (callers hand over their deltas)."""
    import numpy as np

    total = deltas[0]
    if weights[0] != 1.0:
        total *= np.float32(weights[0])
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        total += delta if weight == 1.0 else delta * np.float32(weight)
    return total


def _trim(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep the `int(density · n)` largest magnitudes (and any tied with the smallest kept)."""
    import numpy as np

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
    import numpy as np

    elected_positive = _weighted_sum([tasks[0].copy(), *tasks[1:]], [1.0] * len(tasks)) >= 0
    total = np.zeros_like(tasks[0])
    count = np.zeros(tasks[0].shape, dtype=np.float32)
    for task in tasks:
        agrees = np.where(elected_positive, task > 0, task < 0)
        total += np.where(agrees, task, np.float32(0))
        count += agrees
    return total / np.maximum(count, np.float32(1))


def _drop_and_rescale(delta: np.ndarray, drop_rate: float, seed: int, index: int, tensor: str) -> np.ndarray:
    import numpy as np

    key = int.from_bytes(hashlib.sha256(tensor.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, index, key])
    keep = rng.random(delta.shape, dtype=np.float32) >= drop_rate
    return np.where(keep, delta / np.float32(1 - drop_rate), np.float32(0))


@dataclass(frozen=True)
class Linear(MergeMethod):
    """Task arithmetic: the weighted sum of the deltas."""

    name: ClassVar[str] = "linear"
    elementwise: ClassVar[bool] = True

    def combine(self, deltas, weights, tensor):
        return _weighted_sum(deltas, weights)


@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: trim each weighted delta to its largest entries, elect a sign per entry, average those that agree."""

    name: ClassVar[str] = "ties"
    exact: ClassVar[bool] = False
    parameters: ClassVar[tuple[Parameter, ...]] = (DENSITY,)
    density: float = DENSITY.default

    def combine(self, deltas, weights, tensor):
        import numpy as np

        return _elect_and_mean([_trim(d * np.float32(w), self.density) for d, w in zip(deltas, weights, strict=True)])


@dataclass(frozen=True)
class DareLinear(MergeMethod):
    """DARE: drop entries of each delta at random and rescale the rest, then the weighted sum."""

    name: ClassVar[str] = "dare_linear"
    exact: ClassVar[bool] = False
    uses_seed: ClassVar[bool] = True
    parameters: ClassVar[tuple[Parameter, ...]] = (DROP_RATE,)
    drop_rate: float = DROP_RATE.default
    seed: int = SEED.default

    def combine(self, deltas, weights, tensor):
        dropped = [_drop_and_rescale(d, self.drop_rate, self.seed, i, tensor) for i, d in enumerate(deltas)]
        return _weighted_sum(dropped, weights)


@dataclass(frozen=True)
class DareTies(MergeMethod):
    """DARE's drop-and-rescale, then TIES' sign election and disjoint mean."""

    name: ClassVar[str] = "dare_ties"
    exact: ClassVar[bool] = False
    uses_seed: ClassVar[bool] = True
    parameters: ClassVar[tuple[Parameter, ...]] = (DROP_RATE,)
    drop_rate: float = DROP_RATE.default
    seed: int = SEED.default

    def combine(self, deltas, weights, tensor):
        import numpy as np

        dropped = [_drop_and_rescale(d, self.drop_rate, self.seed, i, tensor) * np.float32(w)
                   for i, (d, w) in enumerate(zip(deltas, weights, strict=True))]
        return _elect_and_mean(dropped)


@dataclass(frozen=True)
class Svd(MergeMethod):
    """The weighted sum re-factored into one LoRA adapter of a chosen rank (best approximation, by SVD).

    `Σ wᵢ sᵢ Bᵢ Aᵢ ≈ B' A'` with `B' = U_k √S_k`, `A' = √S_k V_kᵀ`. The combined delta is
    `B_cat A_cat` with `B_cat = [w₁s₁B₁ | w₂s₂B₂ | …]` (d_out × R) and `A_cat = [A₁; A₂; …]`
    (R × d_in), so its SVD comes from two thin QRs and the SVD of an R × R core — never a
    d_out × d_in matrix. Ranks below `rank` are padded with zeros. Exact when `rank ≥ R`.
    `modules_to_save` copies are combined by `linear` on the saved tensors and written whole.
    """

    name: ClassVar[str] = "svd"
    writes_adapter: ClassVar[bool] = True
    exact: ClassVar[bool] = False
    parameters: ClassVar[tuple[Parameter, ...]] = (RANK,)
    rank: int

    def combine(self, deltas, weights, tensor):
        return _weighted_sum(deltas, weights)

    def exact_for(self, ranks: list[int]) -> bool:
        return self.rank >= sum(ranks)

    def factor(self, factors: list[tuple[np.ndarray, np.ndarray]], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """`[(sᵢBᵢ, Aᵢ)]` (float64) -> `(B' [d_out, rank], A' [rank, d_in])` (float32)."""
        import numpy as np

        b_cat = np.concatenate([b * w for (b, _), w in zip(factors, weights, strict=True)], axis=1)
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

    def write_adapter(self, out_dir: Path, base: BaseWeights, adapters: list[AdapterInfo],
                      bindings: list[list[LoraBinding]], weights: list[float], out_dtype: str | None) -> list[FileRecord]:
        """Write the PEFT adapter (`adapter_model.safetensors`, `adapter_config.json`) into `out_dir`."""
        import numpy as np

        from adapters.peft_format import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
        from merge.deltas import scaled_factors
        from merge.tensorio import from_float32, is_finite, read_float32
        from merge.writer import Entry, HashingFile, hash_file, header_bytes

        dtype = out_dtype or "F32"
        by_module: dict[str, list[tuple[LoraBinding, float]]] = {}
        for bound, w in zip(bindings, weights, strict=True):
            for b in bound:
                by_module.setdefault(b.lora.module, []).append((b, w))
        tensors: list[tuple[Entry, np.ndarray]] = []
        for module, items in sorted(by_module.items()):
            kinds = {b.lora.kind for b, _ in items}
            if len(kinds) > 1:
                raise InputError(f"adapters disagree on whether {module!r} is an embedding; cannot combine them")
            factors = [(b_scaled, a) for a, b_scaled in (scaled_factors(b) for b, _ in items)]
            b_new, a_new = self.factor(factors, [w for _, w in items])
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if kinds == {"embedding"} \
                else ("lora_A.weight", "lora_B.weight")
            for key, value in ((a_key, a_new), (b_key, b_new)):
                tensors.append((Entry(f"{KEY_PREFIX}{module}.{key}", dtype, value.shape), value))
        saved_tensors: dict[str, list[tuple[int, object]]] = {}
        for i, adapter in enumerate(adapters):
            for name, info in adapter.saved_modules.items():
                saved_tensors.setdefault(name, []).append((i, info))
        for name, items in sorted(saved_tensors.items()):
            base_values = read_float32(base.find(name))
            if len(items) == 1 and weights[items[0][0]] == 1.0:
                value = read_float32(items[0][1])
            else:
                value = base_values + self.combine([read_float32(info) - base_values for _, info in items],
                                                   [weights[i] for i, _ in items], name)
            tensors.append((Entry(f"{KEY_PREFIX}{name}", dtype, value.shape), value))
        modules_to_save = sorted({name.rsplit(".", 1)[0] for name in saved_tensors})
        with HashingFile(out_dir / WEIGHTS_NAME) as file:
            file.write(header_bytes([e for e, _ in tensors]))
            for entry, value in tensors:
                stored = np.ascontiguousarray(from_float32(np.ascontiguousarray(value, dtype=np.float32), dtype))
                if not is_finite(stored, dtype):
                    raise InputError(f"re-factored tensor {entry.name!r} contains NaN or inf; nothing was written")
                file.write(stored)
            weights_record = file.record()
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.path.resolve()),
            "r": self.rank, "lora_alpha": self.rank, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "target_modules": sorted(by_module), "modules_to_save": modules_to_save or None,
            "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True, "init_lora_weights": True,
        }
        (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return [weights_record, hash_file(out_dir / CONFIG_NAME)]


METHODS: dict[str, type[MergeMethod]] = {m.name: m for m in (Linear, Ties, DareLinear, DareTies, Svd)}
DEFAULT_METHOD = Linear.name


def make_method(name: str, *, seed: int = 0, **options) -> MergeMethod:
    """Build a method from CLI/API options (`density=`, `drop_rate=`, `rank=`; None = not given).

    Refuses an unknown method, options the method does not declare, and values out of range.
    """
    if name not in METHODS:
        raise InputError(f"unknown merge method {name!r}; expected one of {', '.join(METHODS)}", param="method")
    return METHODS[name].from_options(options, SEED.check(seed))
