"""service.routing: rendezvous hashing with bounded load, as pure functions."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import pytest

from service.routing import choose_engine, rendezvous_order, weight

ENGINES = [f"http://10.0.0.{i}:8100" for i in range(1, 6)]
KEYS = [f"adapter-{i:04d}" for i in range(2000)]


def first_choices(engines: list[str]) -> dict[str, str]:
    return {key: rendezvous_order(key, engines)[0] for key in KEYS}


def test_keys_spread_over_the_engines():
    counts = Counter(first_choices(ENGINES).values())
    assert set(counts) == set(ENGINES)
    assert all(300 <= n <= 500 for n in counts.values()), counts  # 400 each on average; binomial sd ~18


def test_removing_an_engine_moves_only_its_own_keys_each_to_its_second_choice():
    before = first_choices(ENGINES)
    gone = ENGINES[2]
    after = first_choices([e for e in ENGINES if e != gone])
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == gone}
    assert all(after[key] == rendezvous_order(key, ENGINES)[1] for key in moved)


def test_adding_an_engine_only_takes_keys_for_itself():
    before = first_choices(ENGINES[:4])
    after = first_choices(ENGINES)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved and all(after[key] == ENGINES[4] for key in moved)


def test_the_order_ignores_how_engines_are_listed():
    for key in KEYS[:50]:
        assert rendezvous_order(key, ENGINES) == rendezvous_order(key, list(reversed(ENGINES)))


def test_another_process_computes_the_same_route():
    """No shared state and no salted hash: a fresh interpreter (another API replica) agrees."""
    code = ("from service.routing import rendezvous_order as r; import sys, json; "
            f"print(json.dumps([r(k, {ENGINES!r}) for k in {KEYS[:200]!r}]))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""})
    import json

    assert json.loads(other.stdout) == [rendezvous_order(key, ENGINES) for key in KEYS[:200]]
    assert weight(ENGINES[0], "x") == weight(ENGINES[0], "x") != weight(ENGINES[1], "x")


def test_an_idle_fleet_routes_every_key_to_its_first_choice():
    for key in KEYS[:100]:
        assert choose_engine(key, ENGINES, {}, load_factor=1.25) == rendezvous_order(key, ENGINES)[0]


def test_a_saturated_engine_spills_to_the_keys_next_choice():
    key = KEYS[0]
    first, second, third = rendezvous_order(key, ENGINES)[:3]
    # 10 in flight over 5 engines: cap = ceil(1.25 * 11 / 5) = 3; the first choice is at or above it
    assert choose_engine(key, ENGINES, {first: 10}, load_factor=1.25) == second
    assert choose_engine(key, ENGINES, {first: 10, second: 10}, load_factor=1.25) == third
    assert choose_engine(key, ENGINES, {first: 2, second: 2}, load_factor=1.25) == third  # cap ceil(1.25 * 5 / 5) = 2
    assert choose_engine(key, ENGINES, {first: 1}, load_factor=1.25) == second  # cap 1: spills at once ...
    assert choose_engine(key, ENGINES, {first: 7}, load_factor=1.25, min_load=8) == first  # ... not below the floor
    assert choose_engine(key, ENGINES, {first: 8}, load_factor=1.25, min_load=8) == second


def test_bounded_load_keeps_every_engine_under_the_cap_for_one_hot_key():
    in_flight: Counter[str] = Counter()
    for n in range(200):
        engine = choose_engine("hot-adapter", ENGINES, in_flight, load_factor=1.25, min_load=4)
        assert in_flight[engine] < max(4, math.ceil(1.25 * (n + 1) / len(ENGINES)))
        in_flight[engine] += 1
    assert max(in_flight.values()) <= math.ceil(1.25 * 200 / len(ENGINES))  # spread, instead of 200 on one
    assert in_flight[rendezvous_order("hot-adapter", ENGINES)[0]] == max(in_flight.values())


@pytest.mark.parametrize("engines, factor, floor", [([], 1.25, 1), (ENGINES, 0.5, 1), (ENGINES, 1.25, 0)])
def test_bad_arguments_are_refused(engines, factor, floor):
    with pytest.raises(ValueError):
        choose_engine("k", engines, {}, load_factor=factor, min_load=floor)
