"""OpenAI-style public ids: `<prefix>-<24 url-safe random characters>`.

The 24 characters are one uniform draw below 62**24 written in base 62: one `os.urandom`
call per id, where drawing each character with `secrets.choice` would make 24.
"""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
_LENGTH = 24
_SPACE = len(_ALPHABET) ** _LENGTH


def new_id(prefix: str) -> str:
    n = secrets.randbelow(_SPACE)
    chars = []
    for _ in range(_LENGTH):
        n, digit = divmod(n, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return f"{prefix}-" + "".join(chars)
