"""Incremental detokenization over the byte-level tokenizer, and stop strings."""

from __future__ import annotations

from transformers import AutoTokenizer

from serving.detokenizer import IncrementalDetokenizer, OutputText


def test_streamed_text_never_splits_a_utf8_character(llama_base):
    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    text = "héllo wörld — 世界 🎉 ok"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8")), "one token per byte"
    detokenizer = IncrementalDetokenizer(tokenizer)
    chunks = [detokenizer.add(token) for token in ids]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) + detokenizer.flush() == text
    assert chunks[ids.index(tokenizer.encode("🎉")[0]):].count("") >= 3  # the emoji's first 3 bytes wait


def test_stop_strings_are_trimmed_and_held_back_while_streaming():
    out = OutputText(("STOP", "\n\n"))
    sent = []
    for piece in ["Hel", "lo S", "TO", "P and more"]:
        stopped = out.add(piece)
        sent.append(out.emit(stopped))
    assert "".join(sent) == "Hello " and stopped
    assert sent[:3] == ["", "Hell", "o "], "the last 3 characters (len(\"STOP\") - 1) wait"
    plain = OutputText(())
    plain.add("abc")
    assert plain.emit(False) == "abc"
