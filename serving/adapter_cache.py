"""PEFT adapters for the engine: read and checked once, kept in a host LRU, copied into device slots.

Two tiers, vLLM lora/ style:

- host: `max_cpu_loras` adapters' converted weights (`AdapterWeights`: engine dtype, scale folded
  into B), least recently used dropped first. A registered adapter whose host copy was dropped is
  read from its directory again when a request needs it (on the loader thread, never the engine's).
- device: `max_loras` slots (1..max_loras; slot 0 is the base model) in every `Projection` and
  `Embedding`. A slot is pinned while a running request uses it; an adapter takes a free slot, the
  lowest first (the dense LoRA path costs in proportion to the highest slot in use), or else the
  least recently used unpinned one.

`modules_to_save` copies of the embedding or head count against `max_saved_module_bytes` across
all slots; other saved modules are refused at load time, naming the module.
Everything except `read_adapter_weights` runs on the engine thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.errors import InputError
from adapters.peft_format import bind_adapter, read_adapter, read_base
from serving.config import EngineConfig
from serving.errors import NotFound
from serving.models import CausalLM


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter: `id` is unique per load (a reload in place gets a new one)."""

    id: int
    name: str
    path: Path


@dataclass
class AdapterWeights:
    """An adapter converted for the engine, on the host."""

    projections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, sB)
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, sB)
    saved_heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)  # -> (Wᵀ, b)
    saved_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> weight [V, d]
    max_rank: int = 0

    @property
    def saved_bytes(self) -> int:
        tensors = [w for w, _ in self.saved_heads.values()] + list(self.saved_embeddings.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def _merge_instead(name: str, module: str, why: str) -> InputError:
    return InputError(f"adapter '{name}': {why} '{module}'; merge the adapter into a checkpoint instead "
                      f"(loramill merge) and serve that", param="lora_path")


def read_adapter_weights(ref: AdapterRef, model: CausalLM, base_dir: Path, config: EngineConfig) -> AdapterWeights:
    """Read, check and convert a PEFT adapter for `model`. Raises `InputError` (bad adapter, 400) or
    `NotFound` (no adapter at the path, 404); messages name the adapter, not its path."""
    from safetensors import safe_open

    if not (ref.path / "adapter_config.json").is_file():
        raise NotFound(f"Loading lora {ref.name} failed: No adapter found", param="lora_path")
    try:
        info = read_adapter(ref.path)
        bind_adapter(info, read_base(base_dir))
    except InputError as exc:
        raise InputError(str(exc).replace(str(ref.path), f"'{ref.name}'").replace(str(base_dir), "the base model"),
                         param="lora_path") from exc
    if info.max_rank > config.max_lora_rank:
        worst = max(info.loras.values(), key=lambda m: m.rank)
        raise InputError(f"adapter '{ref.name}': LoRA rank {worst.rank} (on {worst.module}) is above the engine's "
                         f"max_lora_rank of {config.max_lora_rank}", param="lora_path", code="rank_too_large")
    for module, lora in info.loras.items():
        if module not in (model.embeddings if lora.kind == "embedding" else model.projections):
            raise _merge_instead(ref.name, module, "the engine cannot apply LoRA on module")
    saved_modules = {}
    for tensor in info.saved_modules:
        module, _, kind = tensor.rpartition(".")
        is_head = module in model.projections and model.projections[module][0] is model.lm_head
        if not (module in model.embeddings or is_head):
            raise _merge_instead(ref.name, module, "the engine serves modules_to_save only on the embedding and the "
                                                   "LM head, not on")
        saved_modules.setdefault(module, {})[kind] = tensor
    weights = AdapterWeights(max_rank=info.max_rank)
    like = dict(dtype=model.dtype)

    with safe_open(str(info.file), framework="pt") as f:
        def get(tensor_info) -> torch.Tensor:
            return f.get_tensor(tensor_info.name).to(torch.float32)

        for module, lora in info.loras.items():
            a, b = get(lora.a), get(lora.b) * lora.scale
            target = weights.embeddings if lora.kind == "embedding" else weights.projections
            target[module] = (a.to(**like), b.to(**like))
        for module, tensors in saved_modules.items():
            key = info.saved_modules[tensors["weight"]].name if "weight" in tensors else None
            if key is None:
                raise _merge_instead(ref.name, module, "the engine serves saved modules with a weight; not")
            weight = f.get_tensor(key).to(**like)
            if module in model.embeddings:
                weights.saved_embeddings[module] = weight
            else:
                bias = f.get_tensor(info.saved_modules[tensors["bias"]].name).to(**like) if "bias" in tensors else None
                weights.saved_heads[module] = (weight.t().contiguous(), bias)
    if weights.saved_bytes > config.max_saved_module_bytes:
        module = next(iter(saved_modules))
        raise _merge_instead(ref.name, module, f"modules_to_save needs {weights.saved_bytes / 2**20:.1f} MiB per "
                                               f"loaded copy, above the engine's max_saved_module_bytes "
                                               f"({config.max_saved_module_bytes / 2**20:.1f} MiB), for module")
    return weights


@dataclass
class _Slot:
    adapter: int | None = None  # AdapterRef.id
    pins: int = 0
    saved_bytes: int = 0
    last_used: int = 0


class AdapterCache:
    """Host LRU and device slot table. Engine thread only."""

    def __init__(self, model: CausalLM, config: EngineConfig, metrics=None):
        self.model, self.config, self.metrics = model, config, metrics
        self.host: OrderedDict[int, AdapterWeights] = OrderedDict()
        self.slots = [_Slot() for _ in range(config.max_loras + 1)]  # index 0: the base model, never used
        self.slot_of: dict[int, int] = {}
        self._clock = 0

    # host tier
    def put_host(self, adapter_id: int, weights: AdapterWeights) -> None:
        self.host[adapter_id] = weights
        self.host.move_to_end(adapter_id)
        while len(self.host) > self.config.max_cpu_loras:
            self.host.popitem(last=False)

    def drop(self, adapter_id: int) -> None:
        """Forget an unloaded (or replaced) adapter: its host copy now, its slot once unpinned."""
        self.host.pop(adapter_id, None)
        slot = self.slot_of.get(adapter_id)
        if slot is not None and self.slots[slot].pins == 0:
            self._free(slot)

    def on_host(self, adapter_id: int) -> bool:
        return adapter_id in self.host or adapter_id in self.slot_of

    # device tier
    def acquire(self, adapter_id: int) -> int | None:
        """Pin the adapter's slot, loading it into one if needed. None: not on the host, or no slot free."""
        self._clock += 1
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self._count("hits")
        else:
            weights = self.host.get(adapter_id)
            if weights is None:
                return None
            slot = self._find_slot(weights.saved_bytes)
            if slot is None:
                return None
            self._load(slot, adapter_id, weights)
        entry = self.slots[slot]
        entry.pins += 1
        entry.last_used = self._clock
        if adapter_id in self.host:
            self.host.move_to_end(adapter_id)
        return slot

    def release(self, slot: int, adapter_id: int, live: bool) -> None:
        """Unpin; `live=False` (the adapter was unloaded or replaced) frees the slot when unpinned."""
        entry = self.slots[slot]
        entry.pins -= 1
        if entry.pins == 0 and not live:
            self._free(slot)

    def _find_slot(self, saved_bytes: int) -> int | None:
        free = [i for i, s in enumerate(self.slots) if i and s.adapter is None]
        evictable = sorted((s.last_used, i) for i, s in enumerate(self.slots) if i and s.adapter is not None and s.pins == 0)
        budget = self.config.max_saved_module_bytes - sum(s.saved_bytes for s in self.slots)
        if saved_bytes > budget:  # free unpinned slots holding saved copies, least recently used first
            for _, i in [(u, i) for u, i in evictable if self.slots[i].saved_bytes]:
                budget += self.slots[i].saved_bytes
                self._free(i, evicted=True)
                free.append(i)
                if saved_bytes <= budget:
                    break
            if saved_bytes > budget:
                return None
        if free:
            return min(free)
        for _, i in evictable:
            if self.slots[i].adapter is not None:
                self._free(i, evicted=True)
                return i
        return None

    def _load(self, slot: int, adapter_id: int, weights: AdapterWeights) -> None:
        model = self.model
        by_projection: dict[int, tuple[object, dict]] = {}
        for module, factors in weights.projections.items():
            proj, part = model.projections[module]
            by_projection.setdefault(id(proj), (proj, {}))[1][part] = factors
        for proj, factors in by_projection.values():
            proj.set_slot(slot, factors)
        for module, (a, b) in weights.embeddings.items():
            model.embeddings[module].set_slot(slot, a, b)
        for module, (weight_t, bias) in weights.saved_heads.items():
            model.projections[module][0].set_saved(slot, weight_t, bias)
        for module, weight in weights.saved_embeddings.items():
            model.embeddings[module].set_saved(slot, weight)
        self.slots[slot] = _Slot(adapter_id, 0, weights.saved_bytes, self._clock)
        self.slot_of[adapter_id] = slot
        self._count("loads")

    def _free(self, slot: int, evicted: bool = False) -> None:
        model = self.model
        for proj, _ in {id(p): (p, i) for p, i in model.projections.values()}.values():
            proj.clear_slot(slot)
        for emb in model.embeddings.values():
            emb.clear_slot(slot)
        adapter = self.slots[slot].adapter
        self.slot_of.pop(adapter, None)
        self.slots[slot] = _Slot()
        if evicted:
            self._count("evictions")

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_event(what)
