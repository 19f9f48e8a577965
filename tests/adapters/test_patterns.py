"""adapters.patterns: PEFT's rank_pattern semantics (checked against PEFT's own `get_pattern_key`), RE2's time."""

from __future__ import annotations

import pytest

from adapters import patterns
from adapters.errors import InputError

MODULES = [f"model.layers.{layer}.{part}" for layer in (0, 1, 10, 11)
           for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")]
MODULES += ["model.embed_tokens", "lm_head", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "a" * 12 + "!"]  # short: PEFT's re runs `(a+)+` on it

KEYS = [
    "q_proj", "v_proj", r"layers\.1\.self_attn\.q_proj", "layers.1.self_attn.q_proj", r"layers\.1\d\..*",
    "model.layers.0.mlp.down_proj", "(q|k)_proj", "[qk]_proj", r"\w+_proj", "mlp\\..*", "lm_head", "embed_tokens",
    "c_.*", ".*", "proj", "layers.1", r"\d+\.self_attn\.v_proj", "(?i:Q_PROJ)", "^model.*", "^q_proj", "q_proj$",
    "a)|(b", r"up_proj|down_proj", "(a+)+", "(self_attn|mlp)\\.(q|up)_proj", r"\bmlp\b.*", "", "x*", "(?P<n>lm)_head",
    r"[^.]+\.c_proj", "c_attn|", "layers.{1,2}0", r"layers\.(0|1)\.mlp\.(up|down)_proj",
]


def peft_values(table: dict, modules: list[str]) -> dict:
    from peft.utils.other import get_pattern_key

    out = {}
    for module in modules:
        key = get_pattern_key(table.keys(), module)
        if key in table:
            out[module] = table[key]
    return out


@pytest.mark.parametrize("start", range(0, len(KEYS), 4))
def test_the_first_matching_key_wins_as_in_peft(start):
    table = {key: i + 1 for i, key in enumerate(KEYS[start:] + KEYS[:start])}
    compiled = patterns.compile_patterns(table, "rank_pattern")
    assert patterns.resolve(table, compiled, MODULES, "rank_pattern") == peft_values(table, MODULES)


@pytest.mark.parametrize("key", KEYS)
def test_each_key_alone_matches_what_peft_matches(key):
    table = {key: 7}
    assert patterns.resolve(table, patterns.compile_patterns(table, "p"), MODULES, "p") == peft_values(table, MODULES)


def test_catastrophic_keys_finish():
    """Python's re takes 2^n steps on these against n `a`s and a `!`; RE2 takes a pass over the names."""
    modules = ["a" * 3000 + "!", "b" * 3000, "model.layers.0." + "a" * 3000]
    for key in ("(a+)+", "(a|a)*", "(a*)*b", "((a+)+)+$", "(.*a){20}"):
        table = {key: 3}
        assert patterns.resolve(table, patterns.compile_patterns(table, "p"), modules, "p") == (
            {modules[2]: 3} if key in ("(a+)+", "(a|a)*", "((a+)+)+$", "(.*a){20}") else {})


def test_the_cost_bound_is_checked_before_searching():
    table = {f"(x|y|z)*{i}.{{30}}": 1 for i in range(300)}
    compiled = patterns.compile_patterns(table, "alpha_pattern")
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(1000)]
    with pytest.raises(InputError, match="alpha_pattern is too costly to match against this adapter's 1000 modules"):
        patterns.resolve(table, compiled, modules, "alpha_pattern")


def test_a_module_by_module_listing_for_a_32_layer_model_fits():
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    modules = [f"model.layers.{layer}.{part}" for layer in range(32) for part in parts]
    table = {module: 8 + i % 3 for i, module in enumerate(reversed(modules))}
    found = patterns.resolve(table, patterns.compile_patterns(table, "rank_pattern"), modules, "rank_pattern")
    assert found == peft_values(table, modules)
