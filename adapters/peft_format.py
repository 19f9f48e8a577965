"""PEFT LoRA adapter directories, read from their config and safetensors header (torch-free).

PEFT's `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named `base_model.model.<module>.<part>`:

    <module>.lora_A.weight      [r, d_in]   <module>.lora_B.weight    [d_out, r]   nn.Linear / Conv1D
    <module>.lora_embedding_A   [r, V]      <module>.lora_embedding_B [d, r]       nn.Embedding
    <module>.base_layer.weight               PEFT's copy of a targeted embedding or head
                                             (`save_embedding_layers`); shape-checked, never used
    <module>.weight / .bias                  the trained copy of a `modules_to_save` module

The delta a LoRA module adds is `ΔW = s · B A` with `s = alpha / r` (rsLoRA: `alpha / sqrt(r)`),
`r` and `alpha` taken from `rank_pattern` / `alpha_pattern` when a pattern matches the module.
A base tensor stores `ΔW` as is for `nn.Linear` ([d_out, d_in]) and transposed for GPT-2's
`Conv1D` ([d_in, d_out]) and for embeddings ([V, d]).

`<module>` is the model's module name (`lm_head`); the base checkpoint may store that module's
weight under another key (GPT-NeoX: `embed_out.weight`), which `BaseWeights.key` finds the way
transformers does (`adapters.layouts`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from adapters import patterns
from adapters.checkpoint import (
    PICKLE_SUFFIXES, HeaderLimits, TensorInfo, read_checkpoint, read_config, read_safetensors_header,
)
from adapters.errors import InputError, brief
from adapters.layouts import is_conv1d, transformers_renames

@contextmanager
def quiet_peft_model_init() -> Iterator[None]:
    """Around building a `PeftModel`: peft reads `model.is_gradient_checkpointing`, which transformers deprecated
    (FutureWarning, "use `is_activation_checkpointing`") — a warning about peft's code, nothing a user can act on.
    Only that one warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # an adapter is these two files, nothing else
KEY_PREFIX = "base_model.model."
# The A and B tensors of a LoRA pair, by kind: "linear" (nn.Linear, Conv1D) or "embedding".
LORA_PARTS = {"linear": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}

# Input-embedding modules a tied `lm_head` may share its weight with.
EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
HEAD_TENSOR = "lm_head.weight"

# What an adapter may hold, checked before its files are parsed. Per base tensor an adapter has at
# most lora_A + lora_B + PEFT's base-layer copy, or one modules_to_save copy; one more module for a
# tied head the base does not store. A header entry is its name plus at most this much JSON (four
# 20-digit numbers, dtype, keys, punctuation); `__metadata__` gets its own allowance.
ADAPTER_TENSORS_PER_BASE_TENSOR = 3
HEADER_ENTRY_BYTES = 160
HEADER_METADATA_BYTES = 64 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
MAX_LORA_ALPHA = 1e6  # as a fine-tuning job's `lora.alpha`
MAX_MODULE_NAMES = 4096  # entries of target_modules / modules_to_save
MAX_MODULE_NAME_CHARS = 1024
_MODULE_NAME = re.compile(r"[!-~]+")  # printable ASCII, no spaces: what `adapters.patterns` relies on

_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "parameter targets (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora)",
}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair of an adapter. `kind` is "linear" (lora_A/lora_B) or "embedding"."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    kind: str
    a: TensorInfo  # [r, d_in] (embedding: [r, V])
    b: TensorInfo  # [d_out, r] (embedding: [d, r])
    rank: int
    alpha: float
    scale: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA


@dataclass(frozen=True)
class AdapterInfo:
    """A PEFT LoRA adapter as read from its directory (no tensor data loaded)."""

    path: Path
    config: dict
    file: Path
    loras: dict[str, LoraModule]  # by module name
    saved_modules: dict[str, TensorInfo]  # modules_to_save copies, by the base tensor name they replace
    base_layer_copies: dict[str, TensorInfo] = field(default_factory=dict)  # by base tensor name

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.loras.values()), default=0)


@dataclass(frozen=True)
class BaseWeights:
    """A base checkpoint's tensors as a merge sees them, with a tied head resolved.

    `tensors` are keyed as the checkpoint stores them. `tied` is `(head tensor, embedding tensor)`
    when `lm_head` shares the input embedding and the checkpoint stores only the embedding.
    """

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    tied: tuple[str, str] | None
    known_renames: dict[str, str] | None = None  # `renamed`, worked out before (e.g. when the base was registered)

    @cached_property
    def renamed(self) -> dict[str, str]:
        """`{model key: checkpoint key}` for the tensors transformers loads under another name.

        Costly on first use when not known (imports transformers; see `adapters.layouts`), so only `key` asks.
        """
        if self.known_renames is not None:
            return self.known_renames
        return transformers_renames(self.config, self.tensors)

    def key(self, name: str) -> str:
        """The checkpoint key of the model's tensor `name` (e.g. `lm_head.weight`).

        `name` itself when the checkpoint stores it so, or when it is the tied head (a merge that
        changes it writes it under its own name); else the key transformers renames to `name` on
        load (GPT-NeoX: `embed_out.weight`); else `name`, which `find` then does not find.
        """
        if name in self.tensors or (self.tied and name == self.tied[0]):
            return name
        return self.renamed.get(name, name)

    def find(self, name: str) -> TensorInfo | None:
        """The stored tensor holding the model's tensor `name`, or the embedding a tied head reads."""
        key = self.key(name)
        if key in self.tensors:
            return self.tensors[key]
        if self.tied and key == self.tied[0]:
            return self.tensors[self.tied[1]]
        return None


@dataclass(frozen=True)
class LoraBinding:
    """A LoRA module bound to the base tensor it changes.

    `tensor`: that tensor's checkpoint key (`BaseWeights.key`). `transposed`: the base tensor
    stores `(B A)ᵀ` (Conv1D, embeddings), else `B A`.
    """

    lora: LoraModule
    tensor: str
    transposed: bool


def read_base(base_dir: Path, renames: dict[str, str] | None = None) -> BaseWeights:
    """Headers and config of a base checkpoint; finds the embedding a missing tied head reads.

    `renames`: the base's `BaseWeights.renamed`, when already known (it then costs nothing).
    """
    base_dir = Path(base_dir)
    tensors = read_checkpoint(base_dir)
    config = read_config(base_dir)
    tied = None
    if config.get("tie_word_embeddings", True) and HEAD_TENSOR not in tensors:
        vocab = config.get("vocab_size")
        candidates = [
            name for name, info in tensors.items()
            if name.split(".")[-2:] in ([leaf, "weight"] for leaf in EMBEDDING_LEAVES)
            and len(info.shape) == 2 and (vocab is None or info.shape[0] == vocab)
        ]
        if len(candidates) == 1:
            tied = (HEAD_TENSOR, candidates[0])
    return BaseWeights(base_dir, config, tensors, tied, renames)


def adapter_header_limits(base: BaseWeights) -> HeaderLimits:
    """What the safetensors header of an adapter for `base` can hold at most (see the constants)."""
    max_tensors = ADAPTER_TENSORS_PER_BASE_TENSOR * (len(base.tensors) + 1)
    longest = max((len(name) for name in base.tensors), default=0) + len(KEY_PREFIX) + len("lora_embedding_A")
    return HeaderLimits(max_bytes=max_tensors * (longest + HEADER_ENTRY_BYTES) + HEADER_METADATA_BYTES,
                        max_tensors=max_tensors,
                        what=f"an adapter for a base of {len(base.tensors)} tensors has at most {max_tensors}")


def _adapter_config(adapter_dir: Path) -> dict:
    """`adapter_config.json`, checked field by field as PEFT's `LoraConfig` would use it.

    `r` a positive integer, `lora_alpha` a finite number in (0, MAX_LORA_ALPHA], `target_modules` a
    string or a list of strings, `modules_to_save` a list of strings or null, `rank_pattern` /
    `alpha_pattern` objects of the same values (their keys are checked in `adapters.patterns`).
    The file is at most MAX_CONFIG_BYTES of UTF-8 JSON without NaN or Infinity.
    """
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{adapter_dir}: no {CONFIG_NAME}; not a PEFT adapter directory")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InputError(f"{CONFIG_NAME} is {size} bytes; at most {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise InputError(f"{CONFIG_NAME}: not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise InputError(f"{CONFIG_NAME}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer of thousands of digits
        raise InputError(f"{CONFIG_NAME}: invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{CONFIG_NAME}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(f"{CONFIG_NAME}: peft_type {brief(peft_type)} is not supported; only LORA adapters are")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise InputError(f"{CONFIG_NAME}: {what} adapters are not supported")
    if not _is_rank(config.get("r")):
        raise InputError(f"{CONFIG_NAME}: r must be a positive integer, got {brief(config.get('r'))}", param="r")
    if not _is_alpha(config.get("lora_alpha")):
        raise InputError(f"{CONFIG_NAME}: lora_alpha must be a number above 0 and at most {MAX_LORA_ALPHA:g}, "
                         f"got {brief(config.get('lora_alpha'))}", param="lora_alpha")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and 0 < len(targets) <= MAX_MODULE_NAME_CHARS) and not _is_names(targets):
        raise InputError(f"{CONFIG_NAME}: target_modules must be a string or a list of strings, got {brief(targets)}",
                         param="target_modules")
    if config.get("modules_to_save") is not None and not _is_names(config["modules_to_save"]):
        raise InputError(f"{CONFIG_NAME}: modules_to_save must be a list of strings or null, "
                         f"got {brief(config['modules_to_save'])}", param="modules_to_save")
    if not isinstance(config.get("use_rslora", False), bool):
        raise InputError(f"{CONFIG_NAME}: use_rslora must be true or false", param="use_rslora")
    for name, valid, what in (("rank_pattern", _is_rank, "a positive integer"),
                              ("alpha_pattern", _is_alpha, f"a number above 0 and at most {MAX_LORA_ALPHA:g}")):
        table = config.get(name) or {}
        if not isinstance(table, dict):
            raise InputError(f"{CONFIG_NAME}: {name} must be an object, got {brief(table)}", param=name)
        for key, value in table.items():
            if not valid(value):
                raise InputError(f"{CONFIG_NAME}: {name}[{brief(key)}] must be {what}, got {brief(value)}",
                                 param=name)
    return config


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_LORA_ALPHA


def _is_names(value) -> bool:
    return (isinstance(value, list) and len(value) <= MAX_MODULE_NAMES
            and all(isinstance(v, str) and 0 < len(v) <= MAX_MODULE_NAME_CHARS for v in value))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _weights_file(adapter_dir: Path) -> Path:
    file = adapter_dir / WEIGHTS_NAME
    if file.is_file():
        return file
    pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise InputError(f"{adapter_dir}: pickled adapter weights ({pickled[0]}) are refused; save with safetensors")
    raise InputError(f"{adapter_dir}: no {WEIGHTS_NAME}")


def _classify(file: Path, tensors: dict[str, TensorInfo], modules_to_save: list[str]
              ) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Sort an adapter's tensors by role: LoRA parts by module, `modules_to_save` copies and
    PEFT's base-layer copies by the model tensor they stand for. Refuses anything else, and names
    that are not printable ASCII (module names are; `adapters.patterns` relies on it)."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    saved: dict[str, TensorInfo] = {}
    copies: dict[str, TensorInfo] = {}
    part_names = "|".join(re.escape(part) for pair in LORA_PARTS.values() for part in pair)
    to_save = set(modules_to_save)
    for key, info in tensors.items():
        if not _MODULE_NAME.fullmatch(key):
            raise InputError(f"{file.name}: tensor name {brief(key)} is not printable ASCII without spaces")
        if info.dtype not in ("F32", "F16", "BF16"):
            raise InputError(f"{file.name}: tensor {key!r} has dtype {info.dtype}; LoRA weights must be floating point")
        name = key.removeprefix(KEY_PREFIX)
        match = re.fullmatch(rf"(.+)\.({part_names})", name)
        module, _, leaf = name.rpartition(".")
        if match:
            parts.setdefault(match[1], {})[match[2]] = info
        elif name.endswith(".base_layer.weight"):
            copies[name.removesuffix(".base_layer.weight") + ".weight"] = info
        elif leaf in ("weight", "bias") and any(".".join(module.split(".")[i:]) in to_save
                                                for i in range(module.count(".") + 1)):
            saved[name] = info
        else:
            raise InputError(f"{file.name}: unsupported adapter tensor {key!r}")
    return parts, saved, copies


def _pair(file: Path, module: str, found: dict[str, TensorInfo], rank: int, alpha: float, rslora: bool) -> LoraModule:
    """One module's A and B as a `LoraModule`, checked against its configured rank."""
    kind = "embedding" if any(part in found for part in LORA_PARTS["embedding"]) else "linear"
    a_key, b_key = LORA_PARTS[kind]
    if a_key not in found or b_key not in found:
        missing = b_key if a_key in found else a_key
        raise InputError(f"{file.name}: module {module!r} has no {missing}")
    a, b = found[a_key], found[b_key]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise InputError(
            f"{file.name}: module {module!r} has {a_key} {list(a.shape)} and {b_key} {list(b.shape)}, "
            f"but its configured rank is {rank}"
        )
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return LoraModule(module, kind, a, b, rank, float(alpha), scale)


def read_adapter(adapter_dir: str | Path, limits: HeaderLimits = HeaderLimits()) -> AdapterInfo:
    """Read and check a PEFT LoRA adapter directory. Raises `InputError` naming what is wrong.

    `limits` bound its safetensors header before it is read (`adapter_header_limits` for an upload;
    the safetensors format's own limits by default). Each module's rank and alpha are PEFT's:
    `rank_pattern` / `alpha_pattern` matched as `adapters.patterns` explains, else `r` / `lora_alpha`.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"adapter {adapter_dir} is not a directory")
    config = _adapter_config(adapter_dir)
    rank_keys = patterns.compile_patterns(config.get("rank_pattern") or {}, "rank_pattern")
    alpha_keys = patterns.compile_patterns(config.get("alpha_pattern") or {}, "alpha_pattern")
    file = _weights_file(adapter_dir)
    parts, saved, copies = _classify(file, read_safetensors_header(file, limits), config.get("modules_to_save") or [])
    modules = list(parts)
    ranks = patterns.resolve(config.get("rank_pattern") or {}, rank_keys, modules, "rank_pattern")
    alphas = patterns.resolve(config.get("alpha_pattern") or {}, alpha_keys, modules, "alpha_pattern")
    rslora = config.get("use_rslora", False)
    loras = {module: _pair(file, module, found, ranks.get(module, config["r"]), alphas.get(module, config["lora_alpha"]),
                           rslora)
             for module, found in parts.items()}
    if not loras and not saved:
        raise InputError(f"{file.name}: no LoRA tensors")
    return AdapterInfo(adapter_dir, config, file, loras, saved, copies)


def bind_adapter(adapter: AdapterInfo, base: BaseWeights) -> list[LoraBinding]:
    """Bind every LoRA module to its base tensor; check every shape against the base.

    A module binds to the checkpoint key that holds its weight (`BaseWeights.key`), so a merge
    writes each tensor under the key the base checkpoint uses. Raises `InputError` naming the
    module or tensor and both shapes when they do not fit.
    """
    model_type = base.config.get("model_type")
    bindings = []
    for module, lora in adapter.loras.items():
        tensor = base.key(f"{module}.weight")
        target = base.find(tensor)
        if target is None:
            raise InputError(f"adapter {adapter.path} targets module {module!r}, which base model {base.path} does not have")
        transposed = lora.kind == "embedding" or is_conv1d(model_type, module)
        rows, cols = lora.b.shape[0], lora.a.shape[1]  # B A is [rows, cols]
        expected = (cols, rows) if transposed else (rows, cols)
        if target.shape != expected:
            raise InputError(
                f"adapter {adapter.path} does not fit base model {base.path}: its LoRA on {tensor} gives a delta of "
                f"shape {list(expected)} but the base tensor has shape {list(target.shape)}"
            )
        bindings.append(LoraBinding(lora, tensor, transposed))
    for tensor, info in {**adapter.saved_modules, **adapter.base_layer_copies}.items():
        target = base.find(tensor)
        if target is None:
            raise InputError(f"adapter {adapter.path} saves {tensor!r}, which base model {base.path} does not have")
        if target.shape != info.shape:
            raise InputError(
                f"adapter {adapter.path} does not fit base model {base.path}: its {tensor} has shape "
                f"{list(info.shape)} but the base tensor has shape {list(target.shape)}"
            )
    return bindings


def validate_adapter(adapter_dir: str | Path, base_dir: str | Path, *, max_rank: int,
                     renames: dict[str, str] | None = None) -> AdapterInfo:
    """Check a PEFT adapter against a base checkpoint by headers alone.

    Refuses pickled weights, unsupported LoRA variants, a header larger than an adapter for this
    base can have (`adapter_header_limits`, checked before it is read), ranks above `max_rank`,
    target modules the base lacks, and any tensor whose shape does not fit (naming the tensor and
    both shapes).
    A module the base stores under another key costs a lookup of transformers' renames
    (`BaseWeights.key`) unless `renames` gives them; everything else reads only the JSON headers.
    """
    base = read_base(Path(base_dir), renames)
    adapter = read_adapter(adapter_dir, adapter_header_limits(base))
    if adapter.max_rank > max_rank:
        worst = max(adapter.loras.values(), key=lambda m: m.rank)
        raise InputError(f"adapter {adapter.path}: rank {worst.rank} on {worst.module!r} is above the maximum of {max_rank}", param="rank")
    bind_adapter(adapter, base)
    return adapter
