"""Request bodies. Strict types (a string is not a number), finite numbers only, no unknown fields: a
typo or an out-of-range value answers 400 with a message that states what is allowed.

A value that may be "auto" or a number in a range (OpenAI's hyperparameters) is one field with
one message for every way it can be wrong, rather than one error per branch of the union.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationInfo,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from adapters.peft_format import MAX_LORA_ALPHA
from adapters.ranks import MAX_DEVICES, SHARDINGS
from merge.options import describe as describe_merges

MODULE_RE = re.compile(r"^[A-Za-z0-9_.]{1,128}$")
SHARD_RE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Number = Annotated[StrictInt | StrictFloat, AfterValidator(_finite)]


def _explained(message: str):
    """A validator that replaces whatever the inner validation said by `message` (what is allowed)."""

    def validate(value: Any, handler, _info: ValidationInfo):
        try:
            return handler(value)
        except ValueError:
            raise PydanticCustomError("invalid_value", message) from None

    return WrapValidator(validate)


def auto_or(kind: type, low: float, high: float, *, low_open: bool = False):
    """`"auto"` or a number of `kind` in [low, high] (or (low, high] with `low_open`), with one clear message."""
    bound = Field(gt=low, le=high) if low_open else Field(ge=low, le=high)
    base = StrictInt if kind is int else Number
    what = "an integer" if kind is int else "a number"
    interval = f"{'above' if low_open else 'from'} {low:g} {'and up' if low_open else ''} to {high:g}".replace("  ", " ")
    return Annotated[Literal["auto"] | Annotated[base, bound], _explained(f"must be 'auto' or {what} {interval}")]


def ranged(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False):
    """A number of `kind` within the bounds given, with one message that states them."""
    base = StrictInt if kind is int else Number
    limits = {}
    parts = []
    if low is not None:
        limits["gt" if low_open else "ge"] = low
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        limits["lt" if high_open else "le"] = high
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    what = "an integer" if kind is int else "a number"
    return Annotated[base, Field(**limits), _explained(f"must be {what} {' and '.join(parts)}".strip())]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(Body):
    """OpenAI's three knobs (each a number or "auto") plus loramill's own, all optional."""

    n_epochs: auto_or(int, 1, 50) = "auto"
    batch_size: auto_or(int, 1, 256) = "auto"
    learning_rate_multiplier: auto_or(float, 0, 100, low_open=True) = "auto"
    max_seq_len: ranged(int, 8, 131072) = 512  # also bounded by the base model's context, at creation
    grad_accum: ranged(int, 1, 1024) = 1
    packing: StrictBool = False
    checkpoint_every: ranged(int, 0) | None = None  # steps; None: once per epoch
    devices: ranged(int, 1, MAX_DEVICES) = 1  # processes training together; also capped by LORAMILL_WORKER_DEVICES
    sharding: Annotated[Literal[SHARDINGS], _explained("must be 'auto', 'ddp' or 'fsdp'")] = "auto"  # with devices > 1


class Supervised(Body):
    hyperparameters: Hyperparameters | None = None


class Method(Body):
    type: Literal["supervised"]
    supervised: Supervised | None = None


def _module_names(value):
    if isinstance(value, list):
        for name in value:
            if not MODULE_RE.match(name):
                raise ValueError(f"invalid module name {name!r}")
    return value


class LoraOptions(Body):
    rank: ranged(int, 1) = 8
    alpha: ranged(float, 0, MAX_LORA_ALPHA, low_open=True) | None = None  # default: 2 * rank
    dropout: ranged(float, 0, 1, high_open=True) = 0.0
    target_modules: Annotated[
        Literal["all-linear"] | Annotated[list[StrictStr], Field(min_length=1, max_length=64),
                                          AfterValidator(_module_names)],
        _explained("must be 'all-linear' or a list of 1 to 64 module names (letters, digits, '_' and '.')"),
    ] = "all-linear"
    use_rslora: StrictBool = False


MetadataKey = Annotated[StrictStr, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[StrictStr, Field(max_length=512)]


class FineTuningJobCreate(Body):
    model: StrictStr
    training_file: StrictStr
    validation_file: StrictStr | None = None
    hyperparameters: Hyperparameters | None = None
    suffix: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    seed: ranged(int, 0, 2**31 - 1) | None = None
    method: Method | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16),
                        _explained("must be at most 16 pairs, keys of 1-64 characters, values of at most 512")] | None = None
    lora: LoraOptions | None = None
    integrations: Annotated[list[dict], Field(max_length=0)] | None = None


class ModelCreate(Body):
    name: StrictStr
    path: Annotated[StrictStr, Field(min_length=1, max_length=4096)]


class MergeAdapter(Body):
    adapter: Annotated[StrictStr, Field(min_length=1, max_length=255)]
    weight: ranged(float, -1e6, 1e6) = 1.0


MERGE = describe_merges()  # the method registry and the dtype table, as data: one source for the CLI and this API


class MergeCreate(Body):
    """A merge. Each method's own options (`density`, `drop_rate`, `rank`) are checked by the method itself when
    the merge is created (`merge.methods.make_method`): an option another method takes is refused."""

    base_model: StrictStr
    adapters: Annotated[list[MergeAdapter], Field(min_length=1, max_length=64)]
    method: Literal[tuple(MERGE["methods"])] = MERGE["default_method"]
    dtype: Literal[tuple(MERGE["dtypes"])] = MERGE["default_dtype"]
    max_shard_size: Annotated[StrictStr, Field(pattern=SHARD_RE.pattern)] = "2GB"
    density: ranged(float, 0, 1, low_open=True) | None = None
    drop_rate: ranged(float, 0, 1, high_open=True) | None = None
    rank: ranged(int, 1) | None = None
    seed: ranged(int, 0, 2**31 - 1) = 0


# -- inference: the OpenAI fields the engines honour (vLLM's `top_k` and `ignore_eos` too); others are refused

StopSequences = Annotated[StrictStr, Field(min_length=1, max_length=256)] | Annotated[
    list[Annotated[StrictStr, Field(min_length=1, max_length=256)]], Field(max_length=4)]


class StreamOptions(Body):
    include_usage: StrictBool = False


class Sampling(Body):
    model: Annotated[StrictStr, Field(min_length=1, max_length=255)]
    temperature: ranged(float, 0, 2) | None = None
    top_p: ranged(float, 0, 1, low_open=True) | None = None
    top_k: ranged(int, -1, 100_000) | None = None
    n: ranged(int, 1, 1) | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StopSequences | None = None
    presence_penalty: ranged(float, -2, 2) | None = None
    frequency_penalty: ranged(float, -2, 2) | None = None
    seed: ranged(int, -(2**63), 2**63 - 1) | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None  # the engine is told the tenant instead
    ignore_eos: StrictBool = False


class CompletionCreate(Sampling):
    prompt: Annotated[
        Annotated[StrictStr, Field(min_length=1)] | Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                                                              Field(min_length=1, max_length=1)],
        _explained("must be a non-empty string, or a list of one (one prompt per request)")]
    max_tokens: ranged(int, 1) | None = 16
    logprobs: ranged(int, 0, 20) | None = None
    echo: StrictBool = False


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[dict[StrictStr, StrictStr]] | None = None
    name: Annotated[StrictStr, Field(max_length=64)] | None = None


class ChatCompletionCreate(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: ranged(int, 1) | None = None
    max_completion_tokens: ranged(int, 1) | None = None
    logprobs: StrictBool = False
    top_logprobs: ranged(int, 0, 20) | None = None
