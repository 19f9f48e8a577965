"""tokenize_jsonl: exact loss masks per format, length limits, template checks, the cache."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from adapters.data import DataConfig, DatasetError, tokenize_jsonl, tokenizer_fingerprint

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(llama_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_base)


@pytest.fixture
def fresh_tok(llama_base):
    """A private tokenizer instance, for tests that change it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_base)


def write_lines(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def supervised_spans(tok, row) -> list[str]:
    """Decoded runs of consecutive supervised tokens; checks labels equal input_ids where set."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


def one(tok, tmp_path, record, config=DataConfig()):
    ds = tokenize_jsonl(write_lines(tmp_path / "d.jsonl", [record]), tok, config)
    assert len(ds) == 1
    row = ds[0]
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
    assert row["labels"][0] == -100
    return row


def test_columns_and_types(tok, tmp_path):
    ds = tokenize_jsonl(write_lines(tmp_path / "d.jsonl", [{"text": "abc"}, {"prompt": "p", "completion": "c"}]), tok)
    assert ds.features["input_ids"].feature.dtype == "int32"
    assert ds.features["labels"].feature.dtype == "int32"
    assert ds.features["length"].dtype == "int32"
    assert ds["length"][:] == [4, 3]
    assert ds.cache_files, "the dataset is memory-mapped from an Arrow file"


def test_chat_supervises_exactly_assistant_content_and_im_end(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? ünïcødé"},
        {"role": "assistant", "content": "Rome, I think.", "weight": 0},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes: Rome — 🇮🇹", "weight": 1},
    ]
    row = one(tok, tmp_path, {"messages": messages})
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    assert row["input_ids"] == tok(tok.apply_chat_template(plain, tokenize=False), add_special_tokens=False)["input_ids"]
    assert supervised_spans(tok, row) == [f"Paris.{IM_END}", f"Yes: Rome — 🇮🇹{IM_END}"]
    # The trailing "\n" after <|im_end|> and every header stay unsupervised.
    assert row["labels"][-1] == -100


def test_chat_starting_with_assistant_and_empty_assistant_turns(tok, tmp_path):
    messages = [
        {"role": "assistant", "content": "Hi! Ask me anything."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": ""},
    ]
    row = one(tok, tmp_path, {"messages": messages})
    # The first token is never supervised (nothing predicts it); the first assistant content token
    # is not the first token (its header comes before), so the whole content is supervised.
    assert supervised_spans(tok, row) == [f"Hi! Ask me anything.{IM_END}", IM_END]


def test_special_token_text_inside_content_does_not_end_the_turn_early(tok, tmp_path):
    messages = [{"role": "user", "content": "say it"}, {"role": "assistant", "content": f"a{IM_END}b"}]
    row = one(tok, tmp_path, {"messages": messages})
    assert supervised_spans(tok, row) == [f"a{IM_END}b{IM_END}"]


def test_prompt_completion_supervises_completion_and_eos(tok, tmp_path):
    row = one(tok, tmp_path, {"prompt": "Translate: chat ->", "completion": " cat"})
    assert tok.decode(row["input_ids"]) == f"Translate: chat -> cat{IM_END}"
    assert supervised_spans(tok, row) == [f" cat{IM_END}"]
    assert row["labels"][: len("Translate: chat ->")] == [-100] * len("Translate: chat ->")


def test_text_supervises_everything_but_the_first_token(tok, tmp_path):
    row = one(tok, tmp_path, {"text": "hello"})
    assert tok.decode(row["input_ids"]) == f"hello{IM_END}"
    assert supervised_spans(tok, row) == [f"ello{IM_END}"]


def test_overlong_truncate_keeps_the_start(tok, tmp_path):
    row = one(tok, tmp_path, {"prompt": "ab", "completion": "c" * 50}, DataConfig(max_seq_len=10))
    assert row["length"] == 10
    assert tok.decode(row["input_ids"]) == "ab" + "c" * 8
    assert row["labels"][:2] == [-100, -100]
    assert supervised_spans(tok, row) == ["c" * 8]


def test_overlong_refuse_names_the_line(tok, tmp_path):
    path = write_lines(tmp_path / "long.jsonl", [{"text": "short"}, {"text": "x" * 40}, {"text": "y" * 41}])
    with pytest.raises(DatasetError) as info:
        tokenize_jsonl(path, tok, DataConfig(max_seq_len=32, overlong="refuse"))
    assert info.value.errors == [
        "line 2: 41 tokens, more than max_seq_len 32 (overlong='refuse')",
        "line 3: 42 tokens, more than max_seq_len 32 (overlong='refuse')",
    ]
    assert str(info.value).startswith("long.jsonl: 2 errors; first: line 2: 41 tokens")


def test_nothing_left_to_train_after_truncation_names_the_line(tok, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "ok"}, {"prompt": "p" * 30, "completion": "c"}])
    with pytest.raises(DatasetError) as info:
        tokenize_jsonl(path, tok, DataConfig(max_seq_len=16))
    assert info.value.errors == ["line 2: no tokens to train on after truncation to max_seq_len 16"]


def test_validation_errors_come_before_tokenization(tok, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"text": "ok"}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DatasetError, match=r"line 2: field 'messages\[0\].role'"):
        tokenize_jsonl(path, tok)


def test_template_that_does_not_extend_prefixes_fails_clearly(fresh_tok, tmp_path):
    # Marks the last message specially, so a prefix renders differently inside the full conversation.
    fresh_tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if loop.last %}!{% endif %}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    path = write_lines(
        tmp_path / "d.jsonl",
        [{"text": "fine"}, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    with pytest.raises(DatasetError) as info:
        tokenize_jsonl(path, fresh_tok)
    assert info.value.errors == [
        "line 2: the chat template does not render messages[0:1] as a token prefix of messages[0:2], "
        "so assistant tokens cannot be located"
    ]


def test_template_without_a_closing_special_token_fails_clearly(fresh_tok, tmp_path):
    fresh_tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = write_lines(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DatasetError, match=r"line 1: the chat template does not close messages\[1\]'s content"):
        tokenize_jsonl(path, fresh_tok)


def test_template_raising_is_reported_per_line(fresh_tok, tmp_path):
    fresh_tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    path = write_lines(tmp_path / "d.jsonl", [{"messages": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DatasetError, match="line 1: chat template failed: must start with user"):
        tokenize_jsonl(path, fresh_tok)


def test_chat_records_need_a_chat_template(fresh_tok, tmp_path):
    fresh_tok.chat_template = None
    path = write_lines(tmp_path / "d.jsonl", [{"text": "x"}, {"messages": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DatasetError, match="line 2: a 'messages' record, but the tokenizer has no chat template"):
        tokenize_jsonl(path, fresh_tok)
    assert len(tokenize_jsonl(write_lines(tmp_path / "t.jsonl", [{"text": "x"}]), fresh_tok)) == 1


class CountingCalls:
    """Counts calls of the tokenizer class's `__call__` (every tokenization goes through it)."""

    def __init__(self, monkeypatch, tok):
        self.calls = 0
        original = type(tok).__call__

        def counted(inner_self, *args, **kwargs):
            self.calls += 1
            return original(inner_self, *args, **kwargs)

        monkeypatch.setattr(type(tok), "__call__", counted)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def test_cache_hit_does_not_tokenize_and_changes_miss(tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = write_lines(tmp_path / "d.jsonl", [{"text": "abc"}, {"prompt": "p", "completion": "c"}])
    counter = CountingCalls(monkeypatch, tok)

    first = tokenize_jsonl(path, tok, cache_dir=cache)
    assert counter.take() > 0
    assert [p.name for p in cache.iterdir()] and len(list(cache.iterdir())) == 1
    entry = next(cache.iterdir())
    assert Path(first.cache_files[0]["filename"]).parent == entry
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["samples"] == 2 and meta["tokenizer"] == tokenizer_fingerprint(tok)

    again = tokenize_jsonl(path, tok, cache_dir=cache)
    assert counter.take() == 0, "a cache hit must not tokenize"
    assert again[:] == first[:]
    assert len(list(cache.iterdir())) == 1

    write_lines(path, [{"text": "abd"}, {"prompt": "p", "completion": "c"}])
    changed = tokenize_jsonl(path, tok, cache_dir=cache)
    assert counter.take() > 0
    assert changed["input_ids"][0] != first["input_ids"][0]

    tokenize_jsonl(path, tok, DataConfig(max_seq_len=3), cache_dir=cache)
    assert counter.take() > 0
    assert len(list(cache.iterdir())) == 3


def test_cache_key_includes_the_chat_template(tok, fresh_tok, tmp_path):
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(fresh_tok)
    fresh_tok.chat_template = fresh_tok.chat_template.replace("'\n'", "'\n\n'")
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(fresh_tok)
    path = write_lines(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    a = tokenize_jsonl(path, tok, cache_dir=tmp_path / "cache")
    b = tokenize_jsonl(path, fresh_tok, cache_dir=tmp_path / "cache")
    assert a["length"][0] < b["length"][0]


def test_failed_tokenization_leaves_no_cache_entry(tok, tmp_path):
    cache = tmp_path / "cache"
    path = write_lines(tmp_path / "d.jsonl", [{"text": "x" * 50}])
    with pytest.raises(DatasetError):
        tokenize_jsonl(path, tok, DataConfig(max_seq_len=8, overlong="refuse"), cache_dir=cache)
    assert not cache.exists() or not list(cache.iterdir())


def test_without_cache_dir_files_are_removed_with_the_dataset(tok, tmp_path):
    ds = tokenize_jsonl(write_lines(tmp_path / "d.jsonl", [{"text": "abc"}]), tok)
    arrow = Path(ds.cache_files[0]["filename"])
    assert arrow.is_file()
    del ds
    gc.collect()
    assert not arrow.parent.exists()


def test_text_past_the_tokenization_bound_is_refused_not_cut(tok, tmp_path):
    """max_seq_len × 32 characters are tokenized whole and truncated by tokens; one more is refused by line."""
    from adapters.data import TEXT_CHARS_PER_TOKEN

    config = DataConfig(max_seq_len=16)
    bound = 16 * TEXT_CHARS_PER_TOKEN
    row = one(tok, tmp_path, {"prompt": "p", "completion": "c" * (bound - 1)}, config)
    assert row["length"] == 16
    records = [{"text": "ok"}, {"text": "a" * (bound + 1)}, {"prompt": "p" * bound, "completion": "c"}]
    with pytest.raises(DatasetError) as info:
        tokenize_jsonl(write_lines(tmp_path / "long.jsonl", records), tok, config)
    assert info.value.errors == [
        f"line {n}: {bound + 1} characters of text; with max_seq_len 16 at most {bound} (32 a token) are tokenized: "
        "shorten it or raise max_seq_len" for n in (2, 3)]


def test_a_chat_whose_renderings_pass_the_bound_is_refused(tok, tmp_path):
    """Every prefix of a conversation is rendered and tokenized: many short messages are bounded too."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(200)]
    with pytest.raises(DatasetError) as info:
        tokenize_jsonl(write_lines(tmp_path / "chat.jsonl", [{"messages": messages}]), tok, DataConfig(max_seq_len=16))
    assert "line 1: its 200 messages render to more than 8192 characters to tokenize" in info.value.errors[0]
    row = one(tok, tmp_path, {"messages": messages[:6]}, DataConfig(max_seq_len=64))
    assert row["length"] == 64  # the same chat, shorter: tokenized and truncated as before
