"""Key digest → tenant, remembered in process for a few seconds.

Every API request authenticates; looking the key's digest up in the job store was a session,
a query and an ORM load on every one of them, a large share of a job creation's cost. With
the answer cached, a known key costs a sha256 and a dict lookup, and the
authentication dependency needs no thread-pool hop.

What this means for revocation (`loramill tenant key revoke`, which writes the store): every API
process, each uvicorn worker of a `serve --workers N` and every replica on other hosts, keeps its
own cache and keeps honouring a revoked key it cached for at most `ttl_s` seconds
(`LORAMILL_TENANT_CACHE_TTL_S`; 0 turns the cache off); then it looks the key up again and refuses
it (tests/service/test_replicas.py). Unknown keys are never cached, so a new key works at once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from jobs.tenants import TenantRef


class TenantCache:
    """At most `max_entries` digests, each kept `ttl_s` seconds from its lookup; least recently used go first."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, TenantRef]] = OrderedDict()
        self._lock = threading.Lock()  # hits come from the event loop, fills from thread-pool threads

    def get(self, digest: str) -> TenantRef | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            expires, tenant = entry
            if self._clock() >= expires:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return tenant

    def put(self, digest: str, tenant: TenantRef) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries[digest] = (self._clock() + self.ttl_s, tenant)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, digest: str | None = None) -> None:
        """Drop one digest (a revoked key), or every entry when `digest` is None."""
        with self._lock:
            if digest is None:
                self._entries.clear()
            else:
                self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)
