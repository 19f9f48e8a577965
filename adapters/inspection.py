"""`loramill inspect`: what a checkpoint holds, read from its safetensors headers alone.

Only `config.json` and the JSON headers of the safetensors files are read (a few KB per shard),
never tensor data, so a 70B checkpoint is inspected in milliseconds.

What the report holds:
- every tensor with shape and dtype, in one of `GROUPS` (embedding, attention, ffn, norm,
  lm_head, other; `buffer` for non-parameter tensors old checkpoints carry, such as GPT-2's
  causal masks `attn.bias` [1, 1, n_ctx, n_ctx] and rotary `inv_freq`);
- parameter counts per group and in total, counted as `transformers` counts
  `model.parameters()`: a tied head shares the embedding matrix, so it is counted once;
- whether the head is tied (`tie_word_embeddings` in config.json, or no head tensor saved);
- problems: tensors whose shape disagrees with config.json, layers missing or beyond
  `num_hidden_layers`, tensors present in some layers but not others, required tensors missing.
  Shape rules exist for the Llama family (`nn.Linear` weights `[d_out, d_in]`) and GPT-2
  (`Conv1D` weights `[d_in, d_out]`); other architectures are listed and counted unchecked.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from adapters.checkpoint import (
    looks_like_hub_id, read_checkpoint, read_config, read_hub_headers, resolve_model_dir, safetensors_files,
)

GROUPS = ("embedding", "attention", "ffn", "norm", "lm_head", "other", "buffer")


# ---------------------------------------------------------------------------------------------
# Dimensions from config.json


@dataclass(frozen=True)
class ModelDims:
    """The sizes config.json fixes, under their Llama names (GPT-2's aliases are mapped)."""

    hidden: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    intermediate: int | None
    vocab: int | None
    layers: int | None
    positions: int | None

    @classmethod
    def from_config(cls, config: dict) -> ModelDims:
        def first(*keys: str) -> int | None:
            for key in keys:
                if isinstance(config.get(key), int):
                    return config[key]
            return None

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        head_dim = first("head_dim")
        if head_dim is None and hidden and heads and hidden % heads == 0:
            head_dim = hidden // heads
        intermediate = first("intermediate_size", "n_inner", "ffn_dim")
        if intermediate is None and config.get("model_type") == "gpt2" and hidden:
            intermediate = 4 * hidden  # GPT2Config: n_inner=None means 4 * n_embd
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=first("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate=intermediate,
            vocab=first("vocab_size"),
            layers=first("num_hidden_layers", "n_layer"),
            positions=first("max_position_embeddings", "n_positions"),
        )


# ---------------------------------------------------------------------------------------------
# Grouping: by name, architecture-agnostic


_BUFFER = re.compile(r"(\.attn\.(bias|masked_bias)|rotary_emb\.inv_freq)$")
_HEAD = re.compile(r"^(lm_head|embed_out)\.")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|embed_positions|tok_embeddings|embed_in)\.")
_NORM = re.compile(r"(^|\.)([a-z_]*norm[a-z_]*|ln_\w+|ln\d*)\.")
_ATTENTION = re.compile(
    r"(^|\.)(self_attn|attn|attention|self_attention|crossattention|cross_attn|"
    r"q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|query_key_value)\."
)
_FFN = re.compile(
    r"(^|\.)(mlp|feed_forward|ffn|experts|block_sparse_moe|"
    r"gate_proj|up_proj|down_proj|gate_up_proj|c_fc|fc1|fc2|w1|w2|w3)\."
)


def tensor_group(name: str) -> str:
    """One of `GROUPS` for a tensor name. Norms are matched before attention/FFN, so a
    `self_attn.q_norm` is a norm."""
    for group, pattern in (("buffer", _BUFFER), ("lm_head", _HEAD), ("embedding", _EMBEDDING), ("norm", _NORM),
                           ("attention", _ATTENTION), ("ffn", _FFN)):
        if pattern.search(name):
            return group
    return "other"


# ---------------------------------------------------------------------------------------------
# Shape rules per naming convention

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRule:
    """Tensors whose name matches `pattern` must have shape `expected(dims)`; `formula` says
    how, in config terms, for the error message."""

    pattern: re.Pattern
    expected: Callable[[ModelDims], Shape]
    formula: str


def _rule(pattern: str, expected: Callable[[ModelDims], Shape], formula: str) -> ShapeRule:
    return ShapeRule(re.compile(pattern), expected, formula)


@dataclass(frozen=True)
class Convention:
    """A family's tensor naming: shape rules, how layer indices appear, what must exist."""

    name: str
    model_types: frozenset[str]
    rules: tuple[ShapeRule, ...]
    layer_pattern: re.Pattern  # group 1 = layer index, group 2 = the name inside the layer
    required: tuple[tuple[re.Pattern, str], ...]  # (pattern, what it is) outside the layers
    default_tied: bool  # tie_word_embeddings when config.json does not say


def _q(d: ModelDims) -> int:
    return d.heads * d.head_dim


def _kv(d: ModelDims) -> int:
    return d.kv_heads * d.head_dim


LLAMA = Convention(
    name="llama",
    model_types=frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                           "olmo", "granite"}),
    rules=(
        _rule(r"(^|\.)embed_tokens\.weight$", lambda d: (d.vocab, d.hidden), "[vocab_size, hidden_size]"),
        _rule(r"^lm_head\.weight$", lambda d: (d.vocab, d.hidden), "[vocab_size, hidden_size]"),
        _rule(r"\.self_attn\.q_proj\.weight$", lambda d: (_q(d), d.hidden),
              "[num_attention_heads * head_dim, hidden_size]"),
        _rule(r"\.self_attn\.q_proj\.bias$", lambda d: (_q(d),), "[num_attention_heads * head_dim]"),
        _rule(r"\.self_attn\.[kv]_proj\.weight$", lambda d: (_kv(d), d.hidden),
              "[num_key_value_heads * head_dim, hidden_size]"),
        _rule(r"\.self_attn\.[kv]_proj\.bias$", lambda d: (_kv(d),), "[num_key_value_heads * head_dim]"),
        _rule(r"\.self_attn\.qkv_proj\.weight$", lambda d: (_q(d) + 2 * _kv(d), d.hidden),
              "[(num_attention_heads + 2 * num_key_value_heads) * head_dim, hidden_size]"),
        _rule(r"\.self_attn\.o_proj\.weight$", lambda d: (d.hidden, _q(d)),
              "[hidden_size, num_attention_heads * head_dim]"),
        _rule(r"\.self_attn\.o_proj\.bias$", lambda d: (d.hidden,), "[hidden_size]"),
        _rule(r"\.self_attn\.[qk]_norm\.weight$", lambda d: (d.head_dim,), "[head_dim]"),
        _rule(r"\.mlp\.(gate|up)_proj\.weight$", lambda d: (d.intermediate, d.hidden),
              "[intermediate_size, hidden_size]"),
        _rule(r"\.mlp\.gate_up_proj\.weight$", lambda d: (2 * d.intermediate, d.hidden),
              "[2 * intermediate_size, hidden_size]"),
        _rule(r"\.mlp\.down_proj\.weight$", lambda d: (d.hidden, d.intermediate), "[hidden_size, intermediate_size]"),
        _rule(r"(^|\.)(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
              r"post_feedforward_layernorm|norm)\.weight$", lambda d: (d.hidden,), "[hidden_size]"),
    ),
    layer_pattern=re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$"),
    required=((re.compile(r"(^|\.)embed_tokens\.weight$"), "token embedding embed_tokens.weight"),),
    default_tied=False,
)

# GPT-2's Conv1D stores weights as [d_in, d_out] (y = x W + b), the transpose of nn.Linear.
GPT2 = Convention(
    name="gpt2",
    model_types=frozenset({"gpt2"}),
    rules=(
        _rule(r"(^|\.)wte\.weight$", lambda d: (d.vocab, d.hidden), "[vocab_size, n_embd]"),
        _rule(r"(^|\.)wpe\.weight$", lambda d: (d.positions, d.hidden), "[n_positions, n_embd]"),
        _rule(r"^lm_head\.weight$", lambda d: (d.vocab, d.hidden), "[vocab_size, n_embd]"),
        _rule(r"\.attn\.c_attn\.weight$", lambda d: (d.hidden, 3 * d.hidden), "Conv1D [n_embd, 3 * n_embd]"),
        _rule(r"\.attn\.c_attn\.bias$", lambda d: (3 * d.hidden,), "[3 * n_embd]"),
        _rule(r"\.attn\.c_proj\.weight$", lambda d: (d.hidden, d.hidden), "Conv1D [n_embd, n_embd]"),
        _rule(r"\.attn\.c_proj\.bias$", lambda d: (d.hidden,), "[n_embd]"),
        _rule(r"\.mlp\.c_fc\.weight$", lambda d: (d.hidden, d.intermediate), "Conv1D [n_embd, n_inner]"),
        _rule(r"\.mlp\.c_fc\.bias$", lambda d: (d.intermediate,), "[n_inner]"),
        _rule(r"\.mlp\.c_proj\.weight$", lambda d: (d.intermediate, d.hidden), "Conv1D [n_inner, n_embd]"),
        _rule(r"\.mlp\.c_proj\.bias$", lambda d: (d.hidden,), "[n_embd]"),
        _rule(r"(^|\.)ln_(1|2|f)\.(weight|bias)$", lambda d: (d.hidden,), "[n_embd]"),
    ),
    layer_pattern=re.compile(r"(?:^|\.)h\.(\d+)\.(.+)$"),
    required=(
        (re.compile(r"(^|\.)wte\.weight$"), "token embedding wte.weight"),
        (re.compile(r"(^|\.)wpe\.weight$"), "position embedding wpe.weight"),
    ),
    default_tied=True,
)

CONVENTIONS = (LLAMA, GPT2)


def convention_for(config: dict) -> Convention | None:
    model_type = config.get("model_type")
    return next((c for c in CONVENTIONS if model_type in c.model_types), None)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class TensorEntry:
    name: str
    group: str
    shape: Shape
    dtype: str
    numel: int
    file: str  # shard file name
    counted: bool  # False for buffers and for a tied head's duplicate of the embedding


@dataclass(frozen=True)
class Problem:
    """One disagreement with config.json. `tensor` names the tensor (or layer) concerned;
    `expected`/`actual` are shapes when the problem is a shape mismatch."""

    tensor: str | None
    message: str
    expected: Shape | None = None
    actual: Shape | None = None


@dataclass(frozen=True)
class GroupTotal:
    tensors: int
    parameters: int


@dataclass
class CheckpointReport:
    path: str
    model_type: str | None
    architectures: list[str]
    convention: str | None  # which shape rules applied; None = listed and counted only
    dims: ModelDims
    files: list[str]
    tensors: list[TensorEntry]
    groups: dict[str, GroupTotal]
    total_parameters: int
    total_bytes: int
    dtypes: dict[str, int]  # safetensors dtype -> number of tensors
    tied_head: bool
    tied_reason: str
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: shapes as lists, everything else plain."""
        return asdict(self)


def inspect_checkpoint(path: str | Path) -> CheckpointReport:
    """Inspect a local checkpoint directory (single file or sharded) or a hub id.

    Raises `InputError` for unusable input: no such path, pickle-only weights, a truncated or
    corrupt safetensors file, missing config.json. Shape problems are reported, not raised.
    """
    if not Path(path).exists() and looks_like_hub_id(str(path)):  # headers by range reads, no weights fetched
        where = str(path)
        config, infos = read_hub_headers(where)
        files = list(dict.fromkeys(info.file.name for info in infos.values()))
    else:
        model_dir = resolve_model_dir(path)
        where, config, infos = str(model_dir), read_config(model_dir), read_checkpoint(model_dir)
        files = [f.name for f in safetensors_files(model_dir)]
    dims = ModelDims.from_config(config)
    convention = convention_for(config)

    has_head = any(_HEAD.search(name) for name in infos)
    tied, tied_reason = _head_tied(config, convention, has_head)

    tensors = []
    for name, info in sorted(infos.items(), key=lambda item: _natural_key(item[0])):
        group = tensor_group(name)
        counted = group != "buffer" and not (group == "lm_head" and tied)
        tensors.append(TensorEntry(name, group, info.shape, info.dtype, info.numel, info.file.name, counted))

    groups = {g: GroupTotal(sum(1 for t in tensors if t.group == g), sum(t.numel for t in tensors if t.group == g and t.counted))
              for g in GROUPS}
    problems = _config_problems(dims, convention)
    if convention is not None and not problems:
        problems += _shape_problems(tensors, dims, convention)
        problems += _layer_problems(tensors, dims, convention)
        problems += _missing_problems(tensors, convention, tied, has_head)

    return CheckpointReport(
        path=where,
        model_type=config.get("model_type"),
        architectures=list(config.get("architectures") or []),
        convention=convention.name if convention else None,
        dims=dims,
        files=files,
        tensors=tensors,
        groups=groups,
        total_parameters=sum(t.numel for t in tensors if t.counted),
        total_bytes=sum(info.nbytes for info in infos.values()),
        dtypes=dict(Counter(t.dtype for t in tensors)),
        tied_head=tied,
        tied_reason=tied_reason,
        problems=problems,
    )


def _natural_key(name: str) -> list:
    """Sort `layers.2` before `layers.10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _head_tied(config: dict, convention: Convention | None, has_head: bool) -> tuple[bool, str]:
    """Tied when config.json says so (also inside `text_config`), else the family default,
    else when no head tensor is saved (transformers then reuses the embedding)."""
    flag = config.get("tie_word_embeddings")
    if flag is None and isinstance(config.get("text_config"), dict):
        flag = config["text_config"].get("tie_word_embeddings")
    source = "config tie_word_embeddings"
    if flag is None and convention is not None:
        flag, source = convention.default_tied, f"{convention.name} default tie_word_embeddings"
    head = "lm_head tensor saved" if has_head else "no lm_head tensor saved"
    if flag is None:
        return not has_head, head
    return bool(flag), f"{source}={str(bool(flag)).lower()}; {head}"


def _config_problems(dims: ModelDims, convention: Convention | None) -> list[Problem]:
    """config.json inconsistencies that make the shape rules meaningless (checked first)."""
    if convention is None:
        return []
    if dims.head_dim is None and dims.hidden and dims.heads:
        return [Problem(None, f"config.json: hidden_size ({dims.hidden}) is not a multiple of num_attention_heads "
                              f"({dims.heads}) and no head_dim is given; shapes not checked")]
    needed = ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "layers")
    missing = [n for n in needed if getattr(dims, n) is None]
    if convention is GPT2 and dims.positions is None:
        missing.append("positions")
    if missing:
        return [Problem(None, f"config.json lacks {', '.join(missing)}; shapes not checked")]
    if dims.heads % dims.kv_heads:
        return [Problem(None, f"config.json: num_attention_heads ({dims.heads}) is not a multiple of "
                              f"num_key_value_heads ({dims.kv_heads}); shapes not checked")]
    return []


def _shape_problems(tensors: list[TensorEntry], dims: ModelDims, convention: Convention) -> list[Problem]:
    problems = []
    for t in tensors:
        rule = next((r for r in convention.rules if r.pattern.search(t.name)), None)
        if rule is None:
            continue
        expected = rule.expected(dims)
        if tuple(t.shape) != expected:
            problems.append(Problem(
                t.name,
                f"{t.name}: shape {list(t.shape)}, expected {list(expected)} = {rule.formula} from config.json",
                expected, tuple(t.shape),
            ))
    return problems


def _layer_problems(tensors: list[TensorEntry], dims: ModelDims, convention: Convention) -> list[Problem]:
    """Layers beyond num_hidden_layers, layers with no tensors, and per-layer tensors that some
    layers have and others lack (every layer of these families holds the same tensors)."""
    by_layer: dict[int, dict[str, str]] = {}  # layer index -> {name inside the layer: full name}
    prefix = ""  # e.g. "model.layers."
    for t in tensors:
        m = convention.layer_pattern.search(t.name)
        if m and t.group != "buffer":
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t.name
            prefix = t.name[: m.start(1)]
    problems = []
    for index in sorted(i for i in by_layer if i >= dims.layers):
        names = sorted(by_layer[index].values())
        problems.append(Problem(names[0], f"layer {index} ({len(names)} tensors, e.g. {names[0]}) is beyond "
                                          f"num_hidden_layers={dims.layers} in config.json"))
    present = {i: by_layer[i] for i in range(dims.layers) if i in by_layer}
    every_inner = sorted(set().union(*present.values())) if present else []
    for index in range(dims.layers):
        if index not in present:
            problems.append(Problem(f"{prefix}{index}", f"layer {index} has no tensors; config.json has "
                                                        f"num_hidden_layers={dims.layers}"))
            continue
        for inner in every_inner:
            if inner not in present[index]:
                other = next(layer[inner] for layer in present.values() if inner in layer)
                problems.append(Problem(f"{prefix}{index}.{inner}",
                                        f"{prefix}{index}.{inner} is missing (other layers have {other})"))
    return problems


def _missing_problems(tensors: list[TensorEntry], convention: Convention, tied: bool, has_head: bool) -> list[Problem]:
    problems = [Problem(None, f"{what} is missing") for pattern, what in convention.required
                if not any(pattern.search(t.name) for t in tensors)]
    if not tied and not has_head:
        problems.append(Problem("lm_head.weight", "lm_head.weight is missing and the head is not tied "
                                                  "(tie_word_embeddings=false): transformers would initialise it randomly"))
    return problems
