"""OpenAI completions and chat requests: parsing, checks, and the response and chunk shapes.

Requests are parsed with pydantic (unknown fields are ignored, as vLLM does); every problem becomes an
`InputError` naming the parameter, which the server answers with 400 in OpenAI's error shape.
Supported beyond OpenAI, as vLLM names them: `top_k`, `ignore_eos`. Refused with a clear message:
`n` or `best_of` above 1, `suffix`, `echo` with `logprobs`, several prompts in one request, tools,
non-text `response_format`, and message content other than text.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.errors import InputError
from serving.sampling import SamplingParams, TokenLogprobs


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and (self.stream_options or {}).get("include_usage"))

    def check_common(self) -> None:
        if self.n not in (None, 1):
            raise InputError(f"n={self.n} is not supported; only one choice per request (n=1)", param="n",
                             code="invalid_value")
        if self.stream_options is not None and not self.stream:
            raise InputError("stream_options is only allowed when stream is true", param="stream_options")

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            bias = tuple((int(token), float(value)) for token, value in (self.logit_bias or {}).items())
        except ValueError as exc:
            raise InputError("logit_bias keys must be token ids", param="logit_bias", code="invalid_value") from exc
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            seed=self.seed,
            stop=stop,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.best_of not in (None, 1):
            raise InputError(f"best_of={self.best_of} is not supported", param="best_of", code="invalid_value")
        if self.suffix:
            raise InputError("suffix is not supported", param="suffix")
        if self.echo and self.logprobs is not None:
            raise InputError("echo with logprobs is not supported", param="echo")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)) \
                and len(self.prompt) != 1:
            raise InputError("several prompts in one request are not supported; send one request per prompt",
                             param="prompt")

    def prompt_ids(self, tokenizer) -> list[int]:
        prompt = self.prompt[0] if isinstance(self.prompt, list) and self.prompt and \
            isinstance(self.prompt[0], (str, list)) else self.prompt
        if isinstance(prompt, str):
            return tokenizer.encode(prompt) if prompt else []
        return list(prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise InputError("messages must not be empty", param="messages")
        if self.tools or self.functions:
            raise InputError("tools and functions are not supported by this engine", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InputError("only response_format {\"type\": \"text\"} is supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InputError("top_logprobs requires logprobs to be true", param="top_logprobs")

    def conversation(self) -> list[dict]:
        out = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise InputError(f"messages[{i}].content: only text parts are supported",
                                         param=f"messages[{i}].content")
                    texts.append(part["text"])
                content = "".join(texts)
            entry = {"role": message.role, "content": content or ""}
            if message.name:
                entry["name"] = message.name
            out.append(entry)
        return out

    def prompt_ids(self, tokenizer) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = tokenizer.apply_chat_template(self.conversation(), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 — a template error is the caller's message shape
            raise InputError(f"messages do not fit the model's chat template: {exc}", param="messages") from exc
        return tokenizer.encode(text, add_special_tokens=False)


def parse(model: type[_Request], body: object) -> _Request:
    """Validate a JSON body; `InputError` naming the first bad field."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InputError(f"{param}: {first['msg']}" if param else first["msg"], param=param,
                         code="invalid_value") from exc
    request.check()
    return request


# --- responses ------------------------------------------------------------------------------

def completion_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Logprobs:
    """Token log-probabilities in the completions shape and in the chat shape."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def completions(self, entries: list[TokenLogprobs], offset: int) -> dict:
        tokens = [self.text(e.token) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _chat_entry(self, token: int, logprob: float) -> dict:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat(self, entries: list[TokenLogprobs]) -> dict:
        return {"content": [{**self._chat_entry(e.token, e.logprob),
                             "top_logprobs": [self._chat_entry(t, lp) for t, lp in e.top]} for e in entries]}
