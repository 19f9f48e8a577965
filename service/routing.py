"""Which engine of a base model serves a request: rendezvous hashing with bounded load.

Pure functions of their arguments (no I/O, no clock, no process state), so every API replica
that sees the same engines computes the same route: there is no coordinator to ask.

- **Rendezvous (highest-random-weight) hashing.** Each engine's weight for a key is
  `blake2b(engine ‖ key)` read as a 64-bit integer; the key goes to the engine with the highest
  weight, and `rendezvous_order` lists the engines by falling weight. Removing an engine only
  moves the keys whose first choice it was (each to its own second choice); adding one only takes
  the keys for which it now weighs most (about 1/n of them). An adapter's key is its id, so its
  requests keep landing on the engine that already holds it in memory. Python's `hash` is salted
  per process and would give every replica a different route, hence blake2b.
- **Bounded load** (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
  Loads", 2018). An engine takes a new request only while its in-flight requests stay under
  `cap = max(min_load, ceil(load_factor * (total + 1) / n))`, where `total` is the in-flight
  count over the `n` candidates; otherwise the request walks down the key's rendezvous order to
  the first engine under the cap. With `load_factor >= 1` one always is: the average load is below
  the cap. `min_load` is the floor below which an engine is never called saturated: an engine
  decodes a batch at once, so at low load a second request for an adapter belongs on the engine
  that holds it, not on another one that would have to load it. A hot
  adapter so spills onto its second engine (which then loads it too) instead of queueing on one,
  and a key's spill-over engine is the same in every replica. The in-flight counts are each API
  process's own: under load two replicas may spill at different moments, which costs at most an
  extra copy of the adapter, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence


def weight(engine: str, key: str) -> int:
    """The engine's 64-bit rendezvous weight for `key`: the same in every process and on every machine."""
    digest = hashlib.blake2b(f"{engine}\n{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, engines: Sequence[str]) -> list[str]:
    """`engines` by falling weight for `key` (ties, vanishingly rare, broken by name)."""
    return sorted(engines, key=lambda engine: (-weight(engine, key), engine))


def choose_engine(key: str, engines: Sequence[str], in_flight: Mapping[str, int], *, load_factor: float,
                  min_load: int = 1) -> str:
    """The first engine in `key`'s rendezvous order whose in-flight count is under the bounded-load cap.

    `engines`: the candidates (healthy, not drained), at least one. `in_flight`: requests running
    per engine (missing = 0). `load_factor` ≥ 1: how far above the mean one engine may go
    (1.25 keeps every engine within 25 % of the mean, rounded up). `min_load` ≥ 1: in-flight
    requests an engine always takes.
    """
    if not engines:
        raise ValueError("no engine to choose from")
    if load_factor < 1:
        raise ValueError(f"load_factor must be at least 1, got {load_factor}")
    total = sum(in_flight.get(engine, 0) for engine in engines)
    if min_load < 1:
        raise ValueError(f"min_load must be at least 1, got {min_load}")
    cap = max(min_load, math.ceil(load_factor * (total + 1) / len(engines)))
    order = rendezvous_order(key, engines)
    return next(engine for engine in order if in_flight.get(engine, 0) < cap)
