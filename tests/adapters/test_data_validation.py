"""validate_jsonl: every bad line is reported with its line number and field, up to the cap."""

from __future__ import annotations

import json

import pytest

from adapters.data import DataConfig, DatasetError, validate_jsonl
from adapters.errors import InputError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def errors_of(path, config=DataConfig()) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        validate_jsonl(path, config)
    exc = info.value
    assert isinstance(exc, InputError)
    assert "\n" not in str(exc)
    assert str(exc).startswith(f"{exc.file.rsplit('/', 1)[-1]}: ")
    return exc


def test_valid_file_counts_records_of_all_three_formats(tmp_path):
    path = write_lines(
        tmp_path / "ok.jsonl",
        [CHAT, "", {"prompt": "2+2=", "completion": "4"}, "   ", {"text": "plain"}, {"text": "x", "id": 7}],
    )
    assert validate_jsonl(path) == 4


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "unterminated', "line 2: invalid JSON: Unterminated string"),
        ("[1, 2]", "line 2: expected a JSON object, got array"),
        ({"prompt": "only a prompt"}, "line 2: field 'completion': missing"),
        ({"prompt": "p", "completion": 4}, "line 2: field 'completion': expected a string, got number"),
        ({"text": None}, "line 2: field 'text': expected a string, got null"),
        ({"text": ""}, "line 2: field 'text': empty string"),
        ({"input": "x"}, "line 2: expected field 'messages', 'prompt' and 'completion', or 'text'; got keys 'input'"),
        ({"text": "t", "prompt": "p", "completion": "c"}, "line 2: fields of two formats"),
        ({"messages": "hi"}, "line 2: field 'messages': expected an array, got string"),
        ({"messages": []}, "line 2: field 'messages': empty array"),
        ({"messages": ["hi"]}, "line 2: field 'messages[0]': expected an object, got string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "line 2: field 'messages[1].role': expected one of system, user, assistant, got 'bot'",
        ),
        ({"messages": [{"content": "a"}]}, "line 2: field 'messages[0].role': missing"),
        ({"messages": [{"role": "assistant"}]}, "line 2: field 'messages[0].content': missing"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]},
            "line 2: field 'messages[1].content': expected a string, got array",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]},
            "line 2: field 'messages[1].weight': expected 0 or 1, got 2",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": True}]},
            "line 2: field 'messages[1].weight': expected 0 or 1, got boolean",
        ),
        (
            {"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]},
            "line 2: field 'messages[0].weight': only assistant messages take a weight",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": []}]},
            "line 2: field 'messages[1].tool_calls': unknown field",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]},
            "line 2: field 'messages': no assistant message to train on",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
            "line 2: field 'messages': no assistant message to train on",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
            "line 2: field 'messages': no assistant message to train on",
        ),
    ],
)
def test_bad_line_names_line_and_field(tmp_path, line, expected):
    path = write_lines(tmp_path / "bad.jsonl", [CHAT, line, {"text": "fine"}])
    exc = errors_of(path)
    assert exc.total == 1
    assert exc.errors[0].startswith(expected), exc.errors
    assert str(exc) == f"bad.jsonl: 1 error; first: {exc.errors[0]}"


def test_invalid_utf8_is_a_line_error(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    assert errors_of(path).errors == ["line 2: not valid UTF-8 (byte 11)"]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n')
    assert validate_jsonl(path) == 1


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert errors_of(path).errors == ["file is empty: no JSON lines"]


def test_missing_file_is_a_dataset_error(tmp_path):
    assert errors_of(tmp_path / "nope.jsonl").errors[0].startswith("cannot read file: No such file")


def test_every_error_is_listed_up_to_the_cap(tmp_path):
    lines = [
        CHAT,
        "not json",
        {"prompt": "p"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b", "weight": 3}]},
        "",
        {"text": 5},
        {"text": "fine"},
        "[]",
    ]
    path = write_lines(tmp_path / "many.jsonl", lines)
    exc = errors_of(path)
    assert [e.split(":", 1)[0] for e in exc.errors] == ["line 2", "line 3", "line 4", "line 4", "line 6", "line 8"]
    assert exc.errors[3] == "line 4: field 'messages[1].weight': only assistant messages take a weight"
    assert str(exc).startswith("many.jsonl: 6 errors; first: line 2: invalid JSON")

    capped = errors_of(path, DataConfig(max_errors=2))
    assert capped.errors == exc.errors[:2]
    assert capped.total == 6
    assert str(capped).startswith("many.jsonl: 6 errors (2 listed); first: line 2:")


def test_validation_streams_large_files_without_reading_them_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "p" * 200, "completion": "c" * 200}) + "\n"
    with open(path, "w") as f:
        for _ in range(20_000):
            f.write(line)
    import tracemalloc

    tracemalloc.start()
    assert validate_jsonl(path) == 20_000
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert path.stat().st_size > 8_000_000
    assert peak < 1_000_000, peak


@pytest.mark.parametrize(
    ("config", "param"),
    [(DataConfig(overlong="drop"), "overlong"), (DataConfig(max_seq_len=1), "max_seq_len"), (DataConfig(max_errors=0), "max_errors")],
)
def test_bad_config_is_refused(tmp_path, config, param):
    path = write_lines(tmp_path / "ok.jsonl", [CHAT])
    with pytest.raises(InputError) as info:
        validate_jsonl(path, config)
    assert info.value.param == param


def test_a_line_past_max_line_bytes_is_refused_while_read(tmp_path):
    """The line is counted in blocks, never held or parsed; the lines after it are still checked."""
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps(CHAT).encode() + b"\n")
        f.write(b'{"text": "' + b"a" * (5 << 20) + b'"}\n')
        f.write(b'{"text": 5}\n')
        f.write(b'{"text": "' + b"b" * 300 + b'"}')  # the last line, without a newline
    exc = errors_of(path, DataConfig(max_line_bytes=4096))
    assert exc.errors == [f"line 2: {(5 << 20) + 12} bytes, longer than the limit of 4096 bytes a line",
                          "line 3: field 'text': expected a string, got number"]
    assert validate_jsonl(path.parent / write_lines(tmp_path / "ok.jsonl", [{"text": "a" * 4083}]),
                          DataConfig(max_line_bytes=4096)) == 1  # 4095 bytes and a newline: fits
    assert "line 1: 4097 bytes" in str(errors_of(write_lines(tmp_path / "no.jsonl", [{"text": "a" * 4085}]),
                                                 DataConfig(max_line_bytes=4096)))
