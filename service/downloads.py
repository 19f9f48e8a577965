"""Downloads checked against the sha256 recorded when the artifact was stored.

- **A whole file** streams while it is hashed; its last chunk is held back until the hash is
  known. A file that does not match (bit rot, a truncated copy, tampering) is logged and counted
  (`loramill_artifact_corruptions_total`), and its response is cut short before the last chunk:
  with `Content-Length` set, a client sees a broken transfer, never a good-looking file.
- **A byte range** (`Range: bytes=a-b`, `a-`, `-n`; one range) is served only after the whole
  file hashed to its digest, then read without hashing; a file verified once is remembered by
  (size, mtime, inode) so resuming a large download does not hash it again. An invalid or
  multi-range `Range` is ignored (the whole file, 200, as RFC 9110 allows); a range that starts
  past the end answers 416 in the API's error shape.
- **An archive** (an adapter, a merged checkpoint) is an uncompressed tar built file by file
  with each file checked the same way; its length is known in advance.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from prometheus_client import Counter

from service.errors import APIError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
SHA_HEADER = "X-Content-Sha256"
CORRUPTIONS = Counter("loramill_artifact_corruptions_total", "Downloads refused: stored bytes did not match their sha256",
                      registry=None)  # registered into each app's registry by `service.metrics`
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class Stored:
    """A stored file as a download sees it: where it is, and the size and sha256 recorded for it."""

    path: Path
    name: str
    size: int
    sha256: str


class Corrupted(Exception):
    pass


def _refuse(stored: Stored, why: str) -> Corrupted:
    CORRUPTIONS.inc()
    log.error("artifact %s (%s) failed its integrity check: %s; it is not served", stored.path, stored.name, why)
    return Corrupted(f"{stored.name}: {why}")


def verified_chunks(stored: Stored) -> Iterator[bytes]:
    """The file's bytes in chunks; the last one only once the whole file matched its size and sha256."""
    digest, seen, held = hashlib.sha256(), 0, None
    with open(stored.path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            seen += len(chunk)
            if seen > stored.size:
                raise _refuse(stored, f"more than the {stored.size} bytes recorded")
            if held is not None:
                yield held
            held = chunk
    if seen != stored.size or digest.hexdigest() != stored.sha256:
        raise _refuse(stored, f"{seen} bytes, sha256 {digest.hexdigest()[:12]}…, recorded {stored.size} bytes, "
                              f"{stored.sha256[:12]}…")
    if held is not None:
        yield held


class VerifiedFiles:
    """Files whose bytes were hashed to their recorded sha256, by (path, size, mtime, inode); LRU-bounded."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def _identity(self, stored: Stored) -> tuple:
        stat = stored.path.stat()
        return str(stored.path), stat.st_size, stat.st_mtime_ns, stat.st_ino

    def ensure(self, stored: Stored) -> None:
        identity = self._identity(stored)
        with self._lock:
            if self._seen.get(identity) == stored.sha256:
                self._seen.move_to_end(identity)
                return
        for _ in verified_chunks(stored):
            pass
        with self._lock:
            self._seen[identity] = stored.sha256
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)


VERIFIED = VerifiedFiles()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`(first, last)` inclusive for one valid byte range, None to serve the whole file; 416 if unsatisfiable."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match[1] == match[2] == "":
        return None  # not one byte range (another unit, several ranges, garbage): ignored
    if match[1] == "":  # the last n bytes
        n = int(match[2])
        if n == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    first = int(match[1])
    if match[2] and int(match[2]) < first:
        return None  # syntactically invalid: ignored
    if first >= size:
        raise _unsatisfiable(size)
    return first, min(int(match[2]) if match[2] else size - 1, size - 1)


def _unsatisfiable(size: int) -> APIError:
    return APIError(416, f"Range not satisfiable: the file has {size} bytes", param="Range",
                    code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"})


def _range_chunks(path: Path, first: int, last: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(first)
        left = last - first + 1
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk


async def file_download(stored: Stored, range_header: str | None, media_type: str) -> StreamingResponse:
    headers = {SHA_HEADER: stored.sha256, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{stored.name}"'}
    wanted = parse_range(range_header, stored.size)
    if wanted is None:
        headers["Content-Length"] = str(stored.size)
        return StreamingResponse(verified_chunks(stored), media_type=media_type, headers=headers)
    try:
        await run_in_threadpool(VERIFIED.ensure, stored)
    except Corrupted as exc:
        raise APIError(500, f"{exc}: the stored file failed its integrity check and is not served",
                       code="artifact_corrupted") from None
    first, last = wanted
    headers.update({"Content-Length": str(last - first + 1), "Content-Range": f"bytes {first}-{last}/{stored.size}"})
    return StreamingResponse(_range_chunks(stored.path, first, last), status_code=206, media_type=media_type,
                             headers=headers)


def _tar_header(arcname: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def archive_download(files: list[Stored], root_name: str) -> StreamingResponse:
    """`files` as a POSIX tar under `root_name/`, each file checked as above; Content-Length exact."""
    headers = [(_tar_header(f"{root_name}/{f.name}", f.size, int(f.path.stat().st_mtime)), f) for f in files]
    end = b"\0" * (2 * tarfile.BLOCKSIZE)
    length = sum(len(h) + f.size + len(_pad(f.size)) for h, f in headers) + len(end)

    def chunks() -> Iterator[bytes]:
        for header, stored in headers:
            yield header
            yield from verified_chunks(stored)
            yield _pad(stored.size)
        yield end

    return StreamingResponse(chunks(), media_type="application/x-tar", headers={
        "Content-Length": str(length), "Content-Disposition": f'attachment; filename="{root_name}.tar"'})

