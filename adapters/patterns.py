"""PEFT's `rank_pattern` / `alpha_pattern`, matched with PEFT's semantics in bounded time (RE2).

PEFT gives a module the value of the first key, in the config's order, for which
`re.match(rf"(.*\\.)?({key})$", module)` matches (`peft.utils.other.get_pattern_key`), else the
default (`r`, `lora_alpha`). The keys come from whoever wrote the adapter, and Python's
backtracking `re` takes time exponential in the module name on keys like `(a+)+`. Here every key
runs in RE2, whose search time is linear in the text for a given program: at most
`program size × text length` steps, in memory bounded by `max_mem`, with the GIL released.

The same answer as PEFT's `re` for every key accepted here:
- the key, composed as PEFT composes it, must compile in both engines: Python-only syntax
  (lookaround, backreferences, atomic groups, possessive repeats, `\\Z`, `(?#...)`) fails in RE2,
  RE2-only syntax (`\\pL`, `\\Q...\\E`, `\\C`, `(?U)`, `(?<name>...)`) fails in Python;
- syntax both accept with different meanings is refused: `{,n}` (Python: 0 to n times; RE2: the
  literal text), `[:` (RE2: a POSIX class), `\\A`/`\\z` and an `m` flag (they anchor at the
  text, not the name, in the joined search below);
- keys and module names are printable ASCII (the adapter's tensor names are checked in
  `adapters.peft_format`), where `.`, `\\w`, `\\d`, `\\s`, `\\b` and case folding agree, and no
  name holds a newline, where Python's `$` (end, or before a final newline) is RE2's.

One search per key covers every module still unassigned: the names joined by newlines, the key
as `(?m)^(?:(.*\\.)?(key)$)`, with RE2's `never_nl` so that no match crosses a newline; a match
starts at a name's first character exactly when `re.match` matches that name. The refusal when
`Σ program size × joined length` exceeds `MAX_MATCH_STEPS` comes before any search, so the
bound holds for every config: one rank_pattern on a 32-layer model listed module by module
costs about 1.2e8, and the worst keys run about 10 ns a step on one core.
"""

from __future__ import annotations

import re

import re2

from adapters.errors import InputError

MAX_KEYS = 1024
MAX_KEY_CHARS = 256
MAX_MATCH_STEPS = 2**28
_RE2_MAX_MEM = 1 << 18  # per compiled key: program and DFA cache
_DIFFERENT_MEANING = re.compile(r"\\[Az]|\{,|\[:|\(\?[-a-zA-Z]*m[-a-zA-Z]*[:)]")
_PRINTABLE_ASCII = re.compile(r"[ -~]*")


def _options() -> re2.Options:
    options = re2.Options()
    options.never_nl = True
    options.log_errors = False
    options.max_mem = _RE2_MAX_MEM
    return options


def compile_patterns(patterns: dict, name: str) -> list:
    """Each key of `patterns` (a config's `name`) compiled for `resolve`, in the config's order.

    Raises `InputError` naming the key for too many or too long keys, an invalid regex, syntax RE2
    cannot run, and syntax whose meaning differs between the engines.
    """
    if len(patterns) > MAX_KEYS:
        raise InputError(f"{name} has {len(patterns)} keys; at most {MAX_KEYS}", param=name)
    options, compiled = _options(), []
    for key in patterns:
        def refuse(why: str):
            return InputError(f"{name} key {key[:MAX_KEY_CHARS]!r}: {why}", param=name)

        if len(key) > MAX_KEY_CHARS:
            raise refuse(f"{len(key)} characters; at most {MAX_KEY_CHARS}")
        if not _PRINTABLE_ASCII.fullmatch(key):
            raise refuse("keys are printable ASCII, as module names are")
        try:
            re.compile(rf"(.*\.)?({key})$")  # what PEFT runs; compiling is linear in the key
        except (re.error, OverflowError, RecursionError) as exc:
            raise refuse(f"not a valid regular expression ({exc})") from None
        if _DIFFERENT_MEANING.search(key):
            raise refuse(r"\A, \z, {,n}, [: and the m flag are not supported (they mean other things in RE2)")
        try:
            compiled.append(re2.compile(rf"(?m)^(?:(.*\.)?({key})$)", options))
        except re2.error as exc:
            raise refuse(f"RE2 cannot run it in linear time ({exc}): lookaround, backreferences and "
                         "repeats over 1000 are not supported") from None
    return compiled


def resolve(patterns: dict, compiled: list, modules: list[str], name: str) -> dict[str, object]:
    """`{module: value of the first key that matches it}` for the modules some key matches.

    `compiled` is `compile_patterns(patterns, name)`. Refuses, before searching, a config whose
    worst-case cost `Σ program size × joined names` is above `MAX_MATCH_STEPS`.
    """
    if not compiled or not modules:
        return {}
    steps = sum(regex.programsize for regex in compiled) * (sum(len(m) + 1 for m in modules))
    if steps > MAX_MATCH_STEPS:
        raise InputError(f"{name} is too costly to match against this adapter's {len(modules)} modules "
                         f"({steps:.2g} RE2 steps; at most {MAX_MATCH_STEPS:.2g}): use fewer or simpler keys",
                         param=name)
    found: dict[str, object] = {}
    left = list(modules)
    for value, regex in zip(patterns.values(), compiled, strict=True):
        starts, offset = {}, 0
        for module in left:
            starts[offset] = module
            offset += len(module) + 1
        for match in regex.finditer("\n".join(left)):
            found[starts[match.start()]] = value
        left = [m for m in left if m not in found]
        if not left:
            break
    re2.purge()  # drop google-re2's cache of compiled programs: a tenant's keys are not kept
    return found
