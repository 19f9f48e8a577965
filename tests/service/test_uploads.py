"""Upload limits: a chunked body (no Content-Length) is refused as soon as it passes the limit, not after."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import func, select

from jobs.tables import FileRow
from tests.service.conftest import stored_files

CHUNK = 16 * 1024


def post_chunked(app, key: str, chunks: int) -> tuple[int, dict, int]:
    """POST /v1/files straight to the ASGI app with a multipart body of `chunks` × 16 KiB and no length.

    Returns (status, JSON body, pieces the app pulled from the client).
    """
    boundary = "loramill-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    line = (json.dumps({"prompt": "x" * 40, "completion": "y"}) + "\n").encode()
    content = line * (chunks * CHUNK // len(line))  # whole JSONL lines, sent in 16 KiB pieces
    body_chunks = [head, *(content[i:i + CHUNK] for i in range(0, len(content), CHUNK)), f"\r\n--{boundary}--\r\n".encode()]
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled < len(body_chunks):
            pulled += 1
            return {"type": "http.request", "body": body_chunks[pulled - 1], "more_body": pulled < len(body_chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"", "root_path": "",
             "server": ("testserver", 80), "client": ("127.0.0.1", 1234),
             "headers": [(b"authorization", f"Bearer {key}".encode()),
                         (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


def test_chunked_upload_past_the_limit_is_refused_while_streaming(api):
    limit = api.settings.max_upload_bytes  # 64 KiB in the fixture
    status, body, pulled = post_chunked(api.app, api.keys["alice"], chunks=640)  # 10 MiB offered
    assert status == 413 and body["error"]["code"] == "file_too_large"
    assert pulled * CHUNK < 4 * limit + 64 * 1024 + 2 * CHUNK  # stopped near the limit, not after 10 MiB
    assert stored_files(api) == []
    with api.app.state.services.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(FileRow)) == 0


def test_chunked_upload_within_the_limit_is_stored(api):
    status, body, _ = post_chunked(api.app, api.keys["alice"], chunks=2)
    assert status == 200, body
    assert body["object"] == "file" and 2 * CHUNK - 100 < body["bytes"] <= 2 * CHUNK and body["purpose"] == "fine-tune"


def test_upload_errors_name_the_uploaded_file_never_the_internal_file_id(api):
    """The stored name is `<file id>.jsonl`; a refusal says the caller's file name, and nothing is stored to name."""
    cases = {
        "bad-json.jsonl": '{"prompt": "a", "completion": "b"\n',
        "missing-field.jsonl": json.dumps({"prompt": "only a prompt"}) + "\n",
        "empty.jsonl": "",
        "bad-role.jsonl": json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n",
    }
    for filename, content in cases.items():
        response = api.upload("alice", content, filename=filename)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert message.startswith(f"{filename}: ") and message.count(filename) == 1, message
        assert "file-" not in message and ".jsonl:" not in message.removeprefix(f"{filename}: "), message
    assert stored_files(api) == []


def test_stored_uploads_are_readable_by_all_like_every_other_file(api):
    """0644, as a file copied or saved by transformers is: not the 0600 of the temporary file behind it."""
    assert api.upload("alice", json.dumps({"prompt": "a", "completion": "b"}) + "\n").status_code == 200
    (stored,) = stored_files(api)
    assert stored.stat().st_mode & 0o777 == 0o644
