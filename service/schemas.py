"""Request bodies. Strict types (a string is not a number) and no unknown fields: a typo answers 400."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MODULE_RE = re.compile(r"^[A-Za-z0-9_.]{1,128}$")
SHARD_RE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
Number = StrictInt | StrictFloat


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(Body):
    """OpenAI's three knobs (each a number or "auto") plus loramill's own, all optional."""

    n_epochs: Literal["auto"] | Annotated[StrictInt, Field(ge=1, le=50)] = "auto"
    batch_size: Literal["auto"] | Annotated[StrictInt, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[Number, Field(gt=0, le=100)] = "auto"
    max_seq_len: Annotated[StrictInt, Field(ge=8, le=131072)] = 512
    grad_accum: Annotated[StrictInt, Field(ge=1, le=1024)] = 1
    packing: StrictBool = False
    checkpoint_every: Annotated[StrictInt, Field(ge=0)] | None = None  # steps; None: once per epoch


class Supervised(Body):
    hyperparameters: Hyperparameters | None = None


class Method(Body):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class LoraOptions(Body):
    rank: Annotated[StrictInt, Field(ge=1)] = 8
    alpha: Annotated[Number, Field(gt=0)] | None = None  # default: 2 * rank
    dropout: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    target_modules: Literal["all-linear"] | Annotated[list[StrictStr], Field(min_length=1, max_length=64)] = "all-linear"
    use_rslora: StrictBool = False

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value):
        if isinstance(value, list):
            for name in value:
                if not MODULE_RE.match(name):
                    raise ValueError(f"invalid module name {name!r}")
        return value


class FineTuningJobCreate(Body):
    model: StrictStr
    training_file: StrictStr
    validation_file: StrictStr | None = None
    hyperparameters: Hyperparameters | None = None
    suffix: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    method: Method | None = None
    metadata: Annotated[dict[StrictStr, Annotated[StrictStr, Field(max_length=512)]], Field(max_length=16)] | None = None
    lora: LoraOptions | None = None
    integrations: Annotated[list[dict], Field(max_length=0)] | None = None


class ModelCreate(Body):
    name: StrictStr
    path: Annotated[StrictStr, Field(min_length=1, max_length=4096)]


class MergeAdapter(Body):
    adapter: StrictStr
    weight: Number = 1.0


class MergeCreate(Body):
    base_model: StrictStr
    adapters: Annotated[list[MergeAdapter], Field(min_length=1, max_length=64)]
    method: Literal["linear", "ties", "dare_linear", "dare_ties", "svd"] = "linear"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: Annotated[StrictStr, Field(pattern=SHARD_RE.pattern)] = "2GB"
    density: Annotated[Number, Field(gt=0, le=1)] | None = None
    drop_rate: Annotated[Number, Field(ge=0, lt=1)] | None = None
    rank: Annotated[StrictInt, Field(ge=1)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] = 0
