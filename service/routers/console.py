"""`/`: the web console, static files shipped in the package (`service/console/`), no build step.

The page is the public API's client and nothing more: it signs in with a tenant's API key, keeps it
in `sessionStorage` and sends it only as `Authorization: Bearer` on the `/v1/` calls it makes, so
it shows exactly what that key may see. These routes need no key (the page holds no data) and
serve only the files shipped in the console directory, by name. Every answer carries a strict
Content-Security-Policy (scripts, styles and connections to this origin only: no inline script,
no `eval`, no third-party host), `Referrer-Policy: no-referrer`, `nosniff` and no framing.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import APIError

router = APIRouter(tags=["console"], include_in_schema=False)
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """The console's files by name: (bytes, media type); read once per process."""
    return {path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
            for path in CONSOLE_DIR.iterdir() if path.is_file() and path.suffix in MEDIA_TYPES}


def _serve(name: str) -> Response:
    found = _assets().get(name)
    if found is None:
        raise APIError(404, f"The console has no file {name!r}", param="name", code="not_found")
    content, media_type = found
    return Response(content, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def console() -> Response:
    return _serve("index.html")


@router.get("/console/{name}")
def console_asset(name: str) -> Response:
    return _serve(name)
