"""Incremental detokenization and stop strings.

`IncrementalDetokenizer.add(token)` returns the text the new token completes. It decodes a short
window (vLLM's prefix/read offsets) and holds text back while the window ends in an incomplete UTF-8
sequence (decoded as U+FFFD): with a byte-level tokenizer one character may take several tokens, and a
stream must never carry half of it. `flush()` releases what is held at the end.

`OutputText` adds stop strings, trimmed as OpenAI trims them: the text ends just before the first
stop string, which is not returned. While streaming it holds back the last `len(longest stop) - 1`
characters, which might be the start of a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


class OutputText:
    """A sequence's text so far, with stop strings; `emit()` hands out the text safe to send."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, new: str) -> bool:
        """Append decoded text; True when a stop string appeared (the text is then cut before it)."""
        if not new or self.stopped:
            return self.stopped
        start = max(0, len(self.text) - self.hold)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def emit(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out
