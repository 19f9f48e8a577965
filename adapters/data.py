"""Fine-tuning datasets: JSONL validation, tokenization with loss masks, and (packed) batches.

A dataset is a JSONL file, one object a line, in one of three formats (lines may mix them):

- chat (OpenAI fine-tuning): `{"messages": [{"role": "system"|"user"|"assistant", "content": str,
  "weight": 0|1 (assistant only, optional)}, ...]}`. Rendered with the tokenizer's chat template;
  loss on each assistant message's content and the end-of-turn token that closes it, unless its
  weight is 0; never on system/user text or template headers.
- completion: `{"prompt": str, "completion": str}` -> `bos? + prompt + completion + eos`; loss on
  `completion + eos`.
- text: `{"text": str}` -> `bos? + text + eos`; loss on every token.

A tokenized sample has `input_ids` and `labels` of equal length L (`labels[t] = input_ids[t]` where
token t is supervised, else -100) and `length = L`. Labels are aligned with the inputs (the model
shifts them: logits at t-1 predict labels[t]), and `labels[0] = -100` always, so the last token of
one packed sample never learns to predict the first token of the next: packed and unpacked losses
are identical token for token.

Packing: samples are placed into rows of at most `max_seq_len` tokens by best-fit decreasing on
their lengths (independent of the shuffle, so the number of rows is a property of the dataset).
Each row carries `position_ids` restarting at 0 per sample and a 4D additive `attention_mask`
`[B, 1, T, T]` (0 where query t may attend key s: same sample and s <= t; the dtype's minimum
elsewhere). Transformers hands a 4D mask to eager and sdpa attention unchanged, whatever
`use_cache` is. Its own packed-sequence detection from `position_ids` alone (masking_utils
`find_packed_sequence_indices`) is skipped whenever a cache object exists, and Llama and GPT-2
create one by default because `config.use_cache` is true, so `position_ids` alone would silently
let samples attend each other unless every caller passed `use_cache=False`.

Bounded cost (a line is whoever uploaded it): `max_line_bytes` refuses a longer line while
reading, without holding it; tokenization never sees more than `max_seq_len × TEXT_CHARS_PER_TOKEN`
characters of a record's text, nor a chat's renderings beyond `PLAN_CHARS_PER_TEXT_CHAR` times
that, and the tokenizer gets at most `_ENCODE_CHARS` characters per call. Text beyond the bound is
refused, not cut: a tokenizer run on a prefix need not give the first `max_seq_len` tokens of the
whole text (BPE merges inside a word depend on characters arbitrarily far ahead: with merges
`cd` before `bc` before `ab`, "abc" is `a|bc` but "abcd" is `ab|cd`), so a cut could change tokens
that truncation keeps. At 32 characters a token, 4 to 8 times what tokenizers average on text,
a refused record would have lost most of its text to truncation anyway.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import weakref
from bisect import bisect_left, insort
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from adapters.errors import InputError

if TYPE_CHECKING:
    import datasets
    import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMAT_KEYS = {"chat": ("messages",), "completion": ("prompt", "completion"), "text": ("text",)}
MESSAGE_KEYS = ("role", "content", "weight")
# Bump when tokenization output changes for the same inputs: invalidates every cache entry.
TOKENIZATION_VERSION = 1
_ENCODE_CHUNK = 256  # records per tokenizer call
_ENCODE_CHARS = 1 << 20  # characters per tokenizer call, unless one record's plan is longer
TEXT_CHARS_PER_TOKEN = 32  # a record's text may be at most max_seq_len times this many characters
PLAN_CHARS_PER_TEXT_CHAR = 16  # a chat's renderings (one per message) at most this times that
_SKIP_BLOCK = 1 << 20


class DatasetError(InputError):
    """A dataset that cannot be trained on. `errors` lists every problem found, up to a cap.

    Each entry names the line and, where there is one, the field:
    `line 3: field 'messages[1].role': expected one of system, user, assistant, got 'bot'`.
    `str(exc)` is one line: `<file>: 3 errors; first: line 3: ...`.
    """

    def __init__(self, file: str | Path, errors: list[str], total: int | None = None):
        total = len(errors) if total is None else total
        name = Path(file).name
        listed = "" if total <= len(errors) else f" ({len(errors)} listed)"
        super().__init__(
            f"{name}: {total} error{'s' if total != 1 else ''}{listed}; first: {errors[0]}",
            param="training_file",
            code="invalid_dataset",
        )
        self.file = str(file)
        self.errors = list(errors)
        self.total = total


@dataclass(frozen=True)
class DataConfig:
    """How JSONL records become training samples.

    `max_seq_len`: longest sample in tokens. `overlong`: "truncate" keeps the first `max_seq_len`
    tokens, "refuse" rejects the line. `max_errors`: how many problems a DatasetError lists.
    `max_line_bytes`: longest line (None: any); the service sets it from its settings.
    """

    max_seq_len: int = 512
    overlong: str = "truncate"
    max_errors: int = 20
    max_line_bytes: int | None = None

    @property
    def max_text_chars(self) -> int:
        """The most characters of text one record may hold (see the module docstring)."""
        return self.max_seq_len * TEXT_CHARS_PER_TOKEN

    def validate(self) -> None:
        if self.max_seq_len < 2:
            raise InputError(f"max_seq_len must be at least 2, got {self.max_seq_len}", param="max_seq_len")
        if self.max_line_bytes is not None and self.max_line_bytes < 1:
            raise InputError(f"max_line_bytes must be positive, got {self.max_line_bytes}", param="max_line_bytes")
        if self.overlong not in ("truncate", "refuse"):
            raise InputError(f"overlong must be 'truncate' or 'refuse', got {self.overlong!r}", param="overlong")
        if self.max_errors < 1:
            raise InputError(f"max_errors must be positive, got {self.max_errors}", param="max_errors")


class _ErrorLog:
    """Collects `line N: ...` messages: all are counted, the first `cap` are kept."""

    def __init__(self, cap: int):
        self.cap = cap
        self.errors: list[str] = []
        self.total = 0

    def add(self, lineno: int, message: str) -> None:
        self.total += 1
        if len(self.errors) < self.cap:
            self.errors.append(f"line {lineno}: {message}")

    def raise_if_any(self, path: Path) -> None:
        if self.total:
            raise DatasetError(path, self.errors, self.total)


# ---------------------------------------------------------------------------------------------
# Reading and validation


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _iter_lines(path: Path, max_line_bytes: int | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(lineno, parsed_object, None)` or `(lineno, None, error)` per non-blank line.

    Streams the file; blank lines are skipped but keep their numbers. A line longer than
    `max_line_bytes` is an error found while reading: at most that many bytes of it are held, and
    it is not parsed. Raises DatasetError if the file cannot be opened.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DatasetError(path, [f"cannot read file: {exc.strerror or exc}"]) from exc
    limit = -1 if max_line_bytes is None else max_line_bytes + 1  # +1 for the newline
    with f:
        lineno = 0
        while raw := f.readline(limit):
            lineno += 1
            if not raw.endswith(b"\n") and len(raw) == limit:
                size = len(raw) + _skip_line(f)
                yield lineno, None, f"{size} bytes, longer than the limit of {max_line_bytes} bytes a line"
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not valid UTF-8 (byte {exc.start + 1})"
                continue
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
            except ValueError as exc:  # an integer of thousands of digits
                yield lineno, None, f"invalid JSON: {exc}"
            except RecursionError:
                yield lineno, None, "invalid JSON: nested too deeply"


def _skip_line(f) -> int:
    """Read past the rest of the current line in blocks; return how many bytes it had (newline excluded)."""
    skipped = 0
    while block := f.read(_SKIP_BLOCK):
        end = block.find(b"\n")
        if end >= 0:
            f.seek(end + 1 - len(block), 1)
            return skipped + end
        skipped += len(block)
    return skipped


def _record_format(obj: dict) -> tuple[str | None, list[str]]:
    """The record's format and its problems as `field ...` messages (empty when valid)."""
    present = [fmt for fmt, keys in FORMAT_KEYS.items() if any(k in obj for k in keys)]
    if not present:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        return None, [f"expected field 'messages', 'prompt' and 'completion', or 'text'; got keys {keys}"]
    if len(present) > 1:
        fields = " and ".join(repr(k) for fmt in present for k in FORMAT_KEYS[fmt] if k in obj)
        return None, [f"fields of two formats ({fields}): a line holds exactly one of messages, prompt/completion or text"]
    fmt = present[0]
    if fmt == "chat":
        return fmt, _chat_problems(obj["messages"])
    problems = []
    for key in FORMAT_KEYS[fmt]:
        if key not in obj:
            problems.append(f"field '{key}': missing")
        elif not isinstance(obj[key], str):
            problems.append(f"field '{key}': expected a string, got {_json_type(obj[key])}")
    if fmt == "text" and not problems and not obj["text"]:
        problems.append("field 'text': empty string")
    return fmt, problems


def _chat_problems(messages: Any) -> list[str]:
    """Problems of a chat record's `messages`: each message's own, then whether any trains."""
    if not isinstance(messages, list):
        return [f"field 'messages': expected an array, got {_json_type(messages)}"]
    if not messages:
        return ["field 'messages': empty array"]
    problems = [problem for i, msg in enumerate(messages) for problem in _message_problems(f"messages[{i}]", msg)]
    if not problems and not any(_is_trained(msg) for msg in messages):
        problems.append(
            "field 'messages': no assistant message to train on (need one with non-empty content and weight 1 or absent)"
        )
    return problems


def _message_problems(where: str, msg: Any) -> list[str]:
    """Problems of one message (`where` is e.g. `messages[2]`): its type, keys, role, content, weight."""
    if not isinstance(msg, dict):
        return [f"field '{where}': expected an object, got {_json_type(msg)}"]
    problems = [f"field '{where}.{key}': unknown field (a message has role, content and optional weight)"
                for key in msg if key not in MESSAGE_KEYS]
    role, content = msg.get("role"), msg.get("content")
    if "role" not in msg:
        problems.append(f"field '{where}.role': missing")
    elif role not in ROLES:
        got = repr(role) if isinstance(role, str) else _json_type(role)
        problems.append(f"field '{where}.role': expected one of {', '.join(ROLES)}, got {got}")
    if "content" not in msg:
        problems.append(f"field '{where}.content': missing")
    elif not isinstance(content, str):
        problems.append(f"field '{where}.content': expected a string, got {_json_type(content)}")
    if "weight" in msg:
        weight = msg["weight"]
        if role != "assistant":
            problems.append(f"field '{where}.weight': only assistant messages take a weight")
        elif isinstance(weight, bool) or weight not in (0, 1):
            got = repr(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) else _json_type(weight)
            problems.append(f"field '{where}.weight': expected 0 or 1, got {got}")
    return problems


def _is_trained(msg: dict) -> bool:
    """An assistant message whose non-empty content the loss covers (weight 1 or absent)."""
    content = msg.get("content")
    return msg.get("role") == "assistant" and isinstance(content, str) and content != "" and msg.get("weight", 1) == 1


def _iter_records(path: Path, log: _ErrorLog, max_line_bytes: int | None = None) -> Iterator[tuple[int, str, dict]]:
    """Yield `(lineno, format, record)` for each valid record; log every invalid one."""
    for lineno, obj, error in _iter_lines(path, max_line_bytes):
        if error is not None:
            log.add(lineno, error)
            continue
        if not isinstance(obj, dict):
            log.add(lineno, f"expected a JSON object, got {_json_type(obj)}")
            continue
        fmt, problems = _record_format(obj)
        for problem in problems:
            log.add(lineno, problem)
        if not problems:
            yield lineno, fmt, obj


def validate_jsonl(path: str | Path, config: DataConfig = DataConfig()) -> int:
    """Check every line of a JSONL dataset and return the number of records.

    Checks: at most `config.max_line_bytes` a line; valid UTF-8 JSON object; exactly one format's
    keys; field types; roles; weights; each chat has an assistant message with non-empty content
    and weight 1 or absent. Other top-level keys (ids, metadata) are ignored; unknown message keys
    are errors. Streams the file (memory bounded by the longest line allowed). Raises DatasetError
    listing up to `config.max_errors` problems with line numbers; an empty file (no records) is an error.
    """
    config.validate()
    path = Path(path)
    log = _ErrorLog(config.max_errors)
    count = sum(1 for _ in _iter_records(path, log, config.max_line_bytes))
    log.raise_if_any(path)
    if count == 0:
        raise DatasetError(path, ["file is empty: no JSON lines"])
    return count


# ---------------------------------------------------------------------------------------------
# Tokenization


class _Encoder:
    """Turns valid records into `(input_ids, labels)` with one tokenizer; batches the tokenizer calls."""

    def __init__(self, tokenizer, config: DataConfig):
        self.tok = tokenizer
        self.config = config
        self.special_ids = set(tokenizer.all_special_ids)
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        marked = tokenizer("a", add_special_tokens=True)["input_ids"]  # bos added by the tokenizer?
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and marked[:1] == [bos] and plain[:1] != [bos] else []
        self.eos = tokenizer.eos_token_id

    def _render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False)

    def _plan(self, fmt: str, rec: dict) -> list[str]:
        """Strings to tokenize for one record (their ids are assembled by `_assemble`).

        Raises `_TooLong` for a record with more text than `max_text_chars`, or a chat whose
        renderings (each prefix of the conversation, to locate the assistant turns) add up to more
        than `PLAN_CHARS_PER_TEXT_CHAR` times that; rendering stops at the bound.
        """
        limit = self.config.max_text_chars
        if fmt == "text":
            texts = [rec["text"]]
        elif fmt == "completion":
            texts = [rec["prompt"], rec["completion"]]
        else:
            texts = [m["content"] for m in rec["messages"]]
        chars = sum(len(t) for t in texts)
        if chars > limit:
            raise _TooLong(f"{chars} characters of text; with max_seq_len {self.config.max_seq_len} at most {limit} "
                           f"({TEXT_CHARS_PER_TOKEN} a token) are tokenized: shorten it or raise max_seq_len")
        if fmt != "chat":
            return texts
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        prefixes = [msgs[: k + 1] for k in range(len(msgs))]
        prefixes += [msgs[:i] + [{"role": "assistant", "content": ""}] for i in self._trained_turns(rec["messages"])]
        budget, strings = limit * PLAN_CHARS_PER_TEXT_CHAR, []
        for prefix in prefixes:
            strings.append(self._render(prefix))
            budget -= len(strings[-1])
            if budget < 0:
                raise _TooLong(f"its {len(msgs)} messages render to more than {limit * PLAN_CHARS_PER_TEXT_CHAR} "
                               f"characters to tokenize (one rendering per message, to find the assistant turns); "
                               f"split it into shorter conversations or raise max_seq_len")
        return strings

    @staticmethod
    def _trained_turns(messages: list[dict]) -> list[int]:
        return [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) == 1]

    def _assemble(self, fmt: str, rec: dict, ids: list[list[int]]) -> tuple[list[int], list[int]]:
        if fmt == "text":
            tokens = self.bos + ids[0] + [self.eos]
            return tokens, list(tokens)
        if fmt == "completion":
            prompt = self.bos + ids[0]
            completion = ids[1] + [self.eos]
            return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
        return self._chat_labels(rec["messages"], ids)

    def _chat_labels(self, messages: list[dict], ids: list[list[int]]) -> tuple[list[int], list[int]]:
        """Supervise each trained assistant turn from its first content token to its closing special token.

        `ids[k]` renders messages[:k+1]; each must extend the previous one token for token. For a
        trained turn i, rendering messages[:i] + an empty assistant message agrees with ids[i] up
        to where the content starts; the turn ends at the last special token (ChatML: <|im_end|>)
        of its part of the rendering.
        """
        n = len(messages)
        for k in range(1, n):
            if ids[k][: len(ids[k - 1])] != ids[k - 1]:
                raise _TemplateError(
                    f"the chat template does not render messages[0:{k}] as a token prefix of messages[0:{k + 1}], "
                    "so assistant tokens cannot be located"
                )
        full = ids[n - 1]
        labels = [IGNORE_INDEX] * len(full)
        for j, i in enumerate(self._trained_turns(messages)):
            turn, empty = ids[i], ids[n + j]
            start = len(ids[i - 1]) if i else 0
            if empty[:start] != turn[:start]:
                raise _TemplateError(f"the chat template renders messages[0:{i}] differently before an assistant message")
            content_start = start
            while content_start < min(len(empty), len(turn)) and empty[content_start] == turn[content_start]:
                content_start += 1
            closers = [t for t in range(start, len(turn)) if turn[t] in self.special_ids]
            if not closers or (messages[i]["content"] and content_start > closers[-1]):
                raise _TemplateError(f"the chat template does not close messages[{i}]'s content with a special token")
            end = closers[-1] + 1
            content_start = min(content_start, closers[-1])
            labels[content_start:end] = turn[content_start:end]
        return full, labels

    def plan(self, lineno: int, fmt: str, rec: dict, log: _ErrorLog) -> list[str] | None:
        """`_plan`, with its problems logged by line (None then)."""
        from jinja2 import TemplateError

        try:
            return self._plan(fmt, rec)
        except _TooLong as exc:
            log.add(lineno, str(exc))
        except (TemplateError, ValueError) as exc:  # incl. a template's raise_exception()
            log.add(lineno, f"chat template failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return None

    def encode_chunk(self, chunk: list[tuple[int, str, dict, list[str]]], log: _ErrorLog) -> Iterator[dict]:
        """Samples for the planned records of `chunk` that encode, in one tokenizer call; problems go to `log`."""
        flat = [s for *_, plan in chunk for s in plan]
        encoded = self.tok(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else []
        pos = 0
        for lineno, fmt, rec, plan in chunk:
            ids = encoded[pos : pos + len(plan)]
            pos += len(plan)
            try:
                input_ids, labels = self._assemble(fmt, rec, ids)
            except _TemplateError as exc:
                log.add(lineno, str(exc))
                continue
            sample = self._fit(lineno, input_ids, labels, log)
            if sample is not None:
                yield sample

    def _fit(self, lineno: int, input_ids: list[int], labels: list[int], log: _ErrorLog) -> dict | None:
        """Apply labels[0] = -100, the length limit and the must-train rule."""
        limit = self.config.max_seq_len
        if len(input_ids) > limit:
            if self.config.overlong == "refuse":
                log.add(lineno, f"{len(input_ids)} tokens, more than max_seq_len {limit} (overlong='refuse')")
                return None
            input_ids, labels = input_ids[:limit], labels[:limit]
        labels[0] = IGNORE_INDEX
        if all(label == IGNORE_INDEX for label in labels):
            cut = f" after truncation to max_seq_len {limit}" if len(input_ids) == limit else ""
            log.add(lineno, f"no tokens to train on{cut}")
            return None
        return {"input_ids": input_ids, "labels": labels, "length": len(input_ids)}


class _TemplateError(Exception):
    """The chat template's rendering does not allow exact loss masks (reported per line)."""


class _TooLong(Exception):
    """A record with more text than tokenization takes (reported per line)."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise DatasetError(path, [f"cannot read file: {exc.strerror or exc}"]) from exc
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary/pipeline, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = {
        "class": type(tokenizer).__name__,
        "pipeline": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, sorted(tokenizer.all_special_ids)],
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")})


def _write_samples(path: Path, tokenizer, config: DataConfig, out: Path) -> int:
    """Validate, then tokenize `path` into `out/data.arrow`; returns the sample count."""
    from datasets.arrow_writer import ArrowWriter

    validate_jsonl(path, config)
    log = _ErrorLog(config.max_errors)
    encoder = _Encoder(tokenizer, config)
    count = 0
    with ArrowWriter(features=_features(), path=str(out / "data.arrow")) as writer:
        chunk: list[tuple[int, str, dict, list[str]]] = []
        chars = 0  # characters the chunk's tokenizer call will take
        for lineno, fmt, rec in _iter_records(path, log, config.max_line_bytes):
            if fmt == "chat" and tokenizer.chat_template is None:
                raise DatasetError(path, [f"line {lineno}: a 'messages' record, but the tokenizer has no chat template"])
            if fmt != "chat" and encoder.eos is None:
                raise DatasetError(path, [f"line {lineno}: a {fmt} record, but the tokenizer has no eos token to end it"])
            plan = encoder.plan(lineno, fmt, rec, log)
            if plan is None:
                continue
            chunk.append((lineno, fmt, rec, plan))
            chars += sum(len(s) for s in plan)
            if len(chunk) == _ENCODE_CHUNK or chars >= _ENCODE_CHARS:
                for sample in encoder.encode_chunk(chunk, log):
                    writer.write(sample)
                    count += 1
                chunk, chars = [], 0
        for sample in encoder.encode_chunk(chunk, log):
            writer.write(sample)
            count += 1
        writer.finalize()
    log.raise_if_any(path)
    return count


def tokenize_jsonl(
    path: str | Path, tokenizer, config: DataConfig = DataConfig(), cache_dir: str | Path | None = None
) -> "datasets.Dataset":
    """Validate and tokenize a JSONL dataset into a memory-mapped `datasets.Dataset`.

    Columns: `input_ids: list[int32]`, `labels: list[int32]` (same length, -100 where no loss),
    `length: int32`. With `cache_dir`, the result is stored under
    `cache_dir/<sha256(file bytes, tokenizer fingerprint, config, version)>/` and a later call with
    the same inputs loads it without reading the tokenizer or re-tokenizing (a cached entry was
    valid when written, and validation depends only on those inputs). Without `cache_dir` it is
    written to a temporary directory removed when the returned dataset is garbage-collected.
    Raises DatasetError (validation and tokenization problems, each naming its line).
    """
    from datasets import Dataset

    config.validate()
    path = Path(path)
    key_source = {
        "file_sha256": _file_sha256(path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "config": asdict(config),
        "version": TOKENIZATION_VERSION,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:32]

    if cache_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="loramill-data-"))
        try:
            _write_samples(path, tokenizer, config, tmp)
            dataset = Dataset.from_file(str(tmp / "data.arrow"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(dataset, shutil.rmtree, str(tmp), True)
        return dataset

    from adapters.fsutil import atomic_directory

    entry = Path(cache_dir) / key
    if not (entry / "data.arrow").is_file():
        with atomic_directory(entry, overwrite=True) as tmp:
            count = _write_samples(path, tokenizer, config, tmp)
            (tmp / "meta.json").write_text(json.dumps({**key_source, "samples": count, "source": str(path)}, indent=2) + "\n")
    return Dataset.from_file(str(entry / "data.arrow"))


# ---------------------------------------------------------------------------------------------
# Batches


def _lengths(dataset: "datasets.Dataset") -> np.ndarray:
    return dataset.with_format("arrow")["length"].to_numpy().astype(np.int64)


def _check_lengths(lengths: np.ndarray, batch_size: int, max_seq_len: int) -> None:
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}", param="batch_size")
    if max_seq_len < 1:
        raise InputError(f"max_seq_len must be positive, got {max_seq_len}", param="max_seq_len")
    if len(lengths) and lengths.max() > max_seq_len:
        raise InputError(
            f"the dataset holds a {int(lengths.max())}-token sample, longer than max_seq_len {max_seq_len}; "
            "tokenize it with the same max_seq_len",
            param="max_seq_len",
        )


def pack_rows(lengths: np.ndarray, max_seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into rows whose lengths sum to <= max_seq_len.

    Samples are taken longest first (ties by index) and each goes into the open row with the
    least room that still fits it. Depends only on `lengths`, so it is the same every epoch.
    O(n log n) plus O(distinct room values) list inserts.
    """
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> indices of rows with that much room
    rooms: list[int] = []  # sorted keys of by_room
    for idx in order.tolist():
        need = int(lengths[idx])
        at = bisect_left(rooms, need)
        if at == len(rooms):
            row, room = len(rows), max_seq_len
            rows.append([])
        else:
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        rows[row].append(idx)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            by_room[left].append(row)
    return rows


def batches_per_epoch(dataset: "datasets.Dataset", *, batch_size: int, max_seq_len: int, packing: bool) -> int:
    """Number of batches `iterate_batches` yields per epoch (the last one may be smaller)."""
    lengths = _lengths(dataset)
    _check_lengths(lengths, batch_size, max_seq_len)
    units = len(pack_rows(lengths, max_seq_len)) if packing else len(lengths)
    return math.ceil(units / batch_size)


def _gather(dataset: "datasets.Dataset", indices: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """input_ids and labels of `indices`, as int64 arrays, in that order."""
    table = dataset.with_format("arrow")[indices]
    out = []
    for column in ("input_ids", "labels"):
        arr = table.column(column).combine_chunks()
        values = arr.flatten().to_numpy().astype(np.int64)
        bounds = np.cumsum(arr.value_lengths().to_numpy())[:-1]
        out.append(np.split(values, bounds))
    return out[0], out[1]


def iterate_batches(
    dataset: "datasets.Dataset",
    *,
    batch_size: int,
    pad_id: int,
    max_seq_len: int,
    packing: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    mask_dtype: "torch.dtype | None" = None,
) -> Iterator[dict[str, "torch.Tensor"]]:
    """One epoch of batches, deterministic for (seed, epoch); int64 tensors unless noted.

    Unpacked: `batch_size` samples right-padded to the longest: `input_ids [B,T]`,
    `attention_mask [B,T]` (1 real, 0 pad), `labels [B,T]` (-100 at pad).
    Packed: `batch_size` rows of `pack_rows` (samples concatenated, right-padded to the longest
    row): `input_ids`, `labels`, `position_ids [B,T]` (0, 1, ... per sample; the padding counts
    as one more sample) and `attention_mask [B,1,T,T]` of `mask_dtype` (default float32; pass the
    model's compute dtype, e.g. torch.bfloat16, for half-precision attention), additive: 0 where
    query t may attend key s (same sample and s <= t), the dtype's minimum elsewhere.
    Either dict goes to `model(**batch)` as is (the model computes the shifted loss from labels);
    count trained tokens as `(labels != -100).sum()`, not from the mask.

    Shuffling permutes samples (unpacked) or rows (packed) with a generator seeded by
    (seed, epoch). `start_batch` skips that many batches without building them (resume).
    """
    import torch

    if seed < 0 or epoch < 0 or start_batch < 0:
        raise InputError(f"seed, epoch and start_batch must be non-negative, got {seed}, {epoch}, {start_batch}", param="seed")
    lengths = _lengths(dataset)
    _check_lengths(lengths, batch_size, max_seq_len)
    units = pack_rows(lengths, max_seq_len) if packing else [[i] for i in range(len(lengths))]
    order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else np.arange(len(units))
    for start in range(start_batch * batch_size, len(units), batch_size):
        rows = [units[u] for u in order[start : start + batch_size].tolist()]
        ids, labels = _gather(dataset, [i for row in rows for i in row])
        if not packing:
            yield _padded_batch(ids, labels, pad_id)
            continue
        row_ids, row_labels, row_positions, row_segments = [], [], [], []
        k = 0
        for row in rows:
            lens = [len(x) for x in ids[k : k + len(row)]]
            row_ids.append(np.concatenate(ids[k : k + len(row)]))
            row_labels.append(np.concatenate(labels[k : k + len(row)]))
            row_positions.append(np.concatenate([np.arange(n) for n in lens]))
            row_segments.append(np.repeat(np.arange(len(row)), lens))
            k += len(row)
        batch = _padded_batch(row_ids, row_labels, pad_id)
        width = batch["input_ids"].shape[1]
        positions = np.stack([np.concatenate([p, np.arange(width - len(p))]) for p in row_positions])
        segments = np.stack([np.concatenate([g, np.full(width - len(g), len(row))])
                             for g, row in zip(row_segments, rows, strict=True)])
        yield {
            "input_ids": batch["input_ids"],
            "position_ids": torch.from_numpy(positions),
            "attention_mask": block_causal_mask(torch.from_numpy(segments), mask_dtype or torch.float32),
            "labels": batch["labels"],
        }


def _padded_batch(ids: list[np.ndarray], labels: list[np.ndarray], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad rows to the longest: input_ids (pad_id), attention_mask (0), labels (-100)."""
    import torch

    width = max(len(x) for x in ids)
    batch_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    batch_labels = np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for r, (x, y) in enumerate(zip(ids, labels, strict=True)):
        batch_ids[r, : len(x)] = x
        batch_labels[r, : len(y)] = y
        mask[r, : len(x)] = 1
    return {"input_ids": torch.from_numpy(batch_ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(batch_labels)}


def block_causal_mask(segments: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """`[B,T]` segment ids -> `[B,1,T,T]` additive mask of `dtype`: 0 where key s <= query t in
    the same segment, `finfo(dtype).min` elsewhere."""
    import torch

    small = segments.to(torch.int32)
    allowed = (small[:, :, None] == small[:, None, :]).tril_()
    keep, drop = torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, keep, drop)[:, None]


def supervised_token_count(dataset: "datasets.Dataset") -> int:
    """Tokens the loss falls on (labels other than -100), read a column chunk at a time."""
    total = 0
    for batch in dataset.iter(batch_size=4096):
        total += sum(int((np.asarray(labels) != IGNORE_INDEX).sum()) for labels in batch["labels"])
    return total
