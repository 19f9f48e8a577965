"""uvicorn's httptools protocol with a bound on the request head (request line + headers).

httptools accepts headers of any size and buffers a header's value until it ends, so a single
request with a 100 MB header costs 100 MB and seconds of parsing before the app sees anything.
Here the bytes of each request's head are counted as they arrive and fed to the parser in
pieces; past `max_head_bytes` the connection is answered `431 Request Header Fields Too Large`
(OpenAI's error shape) and closed, having buffered at most the limit.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def error_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("latin-1") + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses a request head longer than `max_head_bytes` with a 431."""

    max_head_bytes = 32 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    def data_received(self, data: bytes) -> None:
        while self._in_head and data:
            room = self.max_head_bytes - self._head_bytes
            if room <= 0:
                self.transport.write(error_response(
                    431, "Request Header Fields Too Large",
                    f"Request header fields too large: the request line and headers may take {self.max_head_bytes} "
                    "bytes", "headers_too_large"))
                self.transport.close()
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return
        if data:
            super().data_received(data)


def bounded_protocol(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for `uvicorn.run(..., http=...)` with this limit."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})


class SettingsBoundedProtocol(BoundedHttpToolsProtocol):
    """The protocol `loramill serve --workers N` names to uvicorn (`service.http_protocol:SettingsBoundedProtocol`):
    each worker process imports it by name, and the limit is its `LORAMILL_MAX_HEADER_BYTES`."""

    def __init__(self, *args, **kwargs):
        from loramill.settings import get_settings

        self.max_head_bytes = get_settings().max_header_bytes
        super().__init__(*args, **kwargs)
