"""Errors the user can fix. The CLI prints them as one line; the API maps them to HTTP 400."""

import reprlib


class InputError(ValueError):
    """Bad input: a dataset, checkpoint, adapter or option that cannot be used.

    `param` names the offending option or field when there is one (OpenAI's `param`).
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 120


def brief(value) -> str:
    """`repr` of a value taken from input, cut to a readable length and depth for an error message."""
    return _BRIEF.repr(value)
