"""Response bodies: what each route answers, as its `response_model` (validated on the way out, documented in
OpenAPI), and the error body every 4xx/5xx carries (`ErrorResponse`, OpenAI's shape).

Objects are built from rows by `service.objects`; the fields here are the contract a client reads.
OpenAI's objects keep OpenAI's names and fields; loramill's own (adapters, merges) follow their style.
Completions are the engine's answer, relayed: only the fields every engine sends are described, and
others are allowed through.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from jobs.quotas import ACTIVE
from jobs.store import FINISHED

T = TypeVar("T")
Number = int | float  # as given: an integer stays one (a bare `float` would answer 2 as 2.0)


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors


class ErrorDetail(Response):
    message: str = Field(description="What was wrong, and what is allowed")
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, server_error, …")
    param: str | None = Field(description="The request field (dotted path) or header at fault, if one is")
    code: str | None = Field(description="A stable machine-readable code, e.g. invalid_value, file_too_large")


class ErrorResponse(Response):
    """Every error answer, from any layer (authentication, body bounds, validation, routes, the HTTP parser)."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field, file or parameter is not acceptable (nothing was stored)",
    401: "Missing, wrong or revoked API key",
    403: "Not allowed",
    404: "No such object for this tenant (another tenant's object is unknown here too)",
    409: "Conflicts with the object's state",
    413: "Body or upload too large, or the tenant's storage quota is used up",
    416: "Range not satisfiable",
    422: "Idempotency-Key reused for a different request",
    429: "Rate limit, concurrent-job or concurrent-generation quota reached (see Retry-After)",
    503: "A dependency (store, broker, engine) is unavailable",
    507: "The artifact store is full",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, and `default` for any other: all `ErrorResponse`."""
    documented: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}
    documented["default"] = {"model": ErrorResponse, "description": "Any other error, in the same shape"}
    return documented


# -- lists


class Page(Response, Generic[T]):
    """One page of a tenant's objects, oldest first; the next page is `?after=<last_id>`."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None
    last_id: str | None


class Deleted(Response):
    id: str
    object: Literal["file", "adapter"]
    deleted: Literal[True]


# -- files


class FileObject(Response):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"]
    status: Literal["processed"]
    status_details: str | None
    expires_at: int | None


class FileList(Page[FileObject]):
    pass


# -- fine-tuning jobs

Auto = Literal["auto"]


class JobHyperparameters(Response):
    """OpenAI's three: "auto" until the worker has read the dataset and chosen."""

    n_epochs: int | Auto
    batch_size: int | Auto
    learning_rate_multiplier: Number | Auto


class LoramillHyperparameters(Response):
    max_seq_len: int
    grad_accum: int
    packing: bool
    checkpoint_every: int | None = Field(description="Steps between checkpoints; null: once per epoch")
    learning_rate: Number | None = Field(description="2e-4 x the multiplier, once known")
    devices: int = Field(description="Processes (GPUs) training together")
    sharding: Literal["auto", "ddp", "fsdp"] = Field(description='How devices > 1 hold the base; "auto" until chosen')


class LoraSettings(Response):
    rank: int
    alpha: Number
    dropout: Number
    target_modules: Literal["all-linear"] | list[str]
    use_rslora: bool


class SupervisedMethod(Response):
    hyperparameters: JobHyperparameters


class JobMethod(Response):
    type: Literal["supervised"]
    supervised: SupervisedMethod


class JobError(Response):
    code: str
    message: str
    param: str | None


class FineTuningJob(Response):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    organization_id: str
    status: Literal[tuple(dict.fromkeys((*ACTIVE, *FINISHED)))]  # type: ignore[valid-type]
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    fine_tuned_model: str | None
    trained_tokens: int | None
    result_files: list[str]
    seed: int
    error: JobError | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]]
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    method: JobMethod
    lora: LoraSettings
    adapter_id: str | None = Field(description="The adapter the job produced, once it succeeded")
    loramill_hyperparameters: LoramillHyperparameters


class FineTuningJobList(Page[FineTuningJob]):
    pass


class JobEvent(Response):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warning", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class JobEventList(Page[JobEvent]):
    pass


class Checkpoint(Response):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Number | None]
    fine_tuned_model_checkpoint: str


class CheckpointList(Page[Checkpoint]):
    pass


# -- stored artifacts, adapters


class ArtifactFile(Response):
    name: str
    bytes: int
    sha256: str


class Adapter(Response):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    base_model: str
    rank: int
    target_modules: list[str]
    bytes: int
    created_at: int
    fine_tuning_job_id: str | None = Field(description="The job that trained it; null when uploaded")
    fine_tuned_model: str | None
    files: list[ArtifactFile] = Field(description="Its files, each downloadable from /files/{name}")


class AdapterList(Page[Adapter]):
    pass


# -- merges


class MergedAdapter(Response):
    adapter: str = Field(description="As the request named it: an adapter id or a fine-tuned model name")
    adapter_id: str
    weight: Number


class MergeFiles(Response):
    object: Literal["list"] = "list"
    data: list[ArtifactFile]


class Merge(Response):
    id: str
    object: Literal["merge"] = "merge"
    created_at: int
    finished_at: int | None
    status: Literal[tuple(dict.fromkeys((*ACTIVE, *FINISHED)))]  # type: ignore[valid-type]
    base_model: str
    error: JobError | None
    adapters: list[MergedAdapter]
    method: str
    dtype: str
    max_shard_size: str
    density: Number | None
    drop_rate: Number | None
    rank: int | None
    seed: int
    files: list[ArtifactFile] = Field(description="The merged checkpoint's files, once it succeeded")


class MergeList(Page[Merge]):
    pass


class MergeEvent(JobEvent):
    object: Literal["merge.event"] = "merge.event"  # type: ignore[assignment]


class MergeEventList(Page[MergeEvent]):
    pass


# -- models


class Model(Response):
    """A base model (owned by "system")."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class AdapterModel(Model):
    """One of the tenant's adapters as a model: its fine-tuned model name, or its id if uploaded."""

    parent: str = Field(description="The base model it adapts")


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[Annotated[AdapterModel | Model, Field(union_mode="left_to_right")]]
    has_more: bool
    first_id: str | None
    last_id: str | None


# -- completions (the engine's answer, relayed with `model` as the caller wrote it)


class Relayed(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(Relayed):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Relayed):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class Completion(Relayed):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(Relayed):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(Relayed):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(Relayed):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


BINARY = {"type": "string", "format": "binary"}


def download(media_type: str, description: str, *, ranges: bool = False) -> dict[int, dict[str, Any]]:
    """OpenAPI `responses` of a download: 200 with `media_type` bytes, and 206 for one byte range with `ranges`."""
    whole = {"content": {media_type: {"schema": BINARY}}, "description": description}
    if not ranges:
        return {200: whole}
    return {200: whole, 206: {**whole, "description": "One byte range of it (Range: bytes=a-b, a-, -n)"}}


def streamed(what: str) -> dict[str, Any]:
    """The OpenAPI content of a `stream: true` answer: server-sent events, each `data: <chunk JSON>`, then `[DONE]`."""
    return {"text/event-stream": {
        "schema": {"type": "string", "description": f"With stream: true, server-sent events: `data: <{what} JSON>` "
                                                    "lines, then `data: [DONE]`"}}}


# -- health


class Health(Response):
    status: Literal["ok"]


class Readiness(Response):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description='Each dependency: "ok" or "unavailable: <why>"')
