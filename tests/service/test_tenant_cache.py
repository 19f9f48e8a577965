"""The in-process key → tenant cache: what it remembers, for how long, and what revocation means."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, event

from jobs.tenants import key_digest
from jobs.ids import new_id
from jobs.tables import ApiKey, Tenant
from service.tenant_cache import TenantCache, TenantRef


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ALICE, BOB = TenantRef("tenant-a", "alice"), TenantRef("tenant-b", "bob")


def test_an_entry_lives_ttl_seconds_from_its_lookup():
    clock = Clock()
    cache = TenantCache(ttl_s=10, clock=clock)
    cache.put("d1", ALICE)
    clock.now += 9.9
    assert cache.get("d1") == ALICE
    clock.now += 0.1
    assert cache.get("d1") is None and len(cache) == 0


def test_the_least_recently_used_entry_goes_first_when_full():
    cache = TenantCache(ttl_s=10, max_entries=2, clock=Clock())
    cache.put("d1", ALICE)
    cache.put("d2", BOB)
    assert cache.get("d1") == ALICE  # d2 is now the least recently used
    cache.put("d3", BOB)
    assert cache.get("d2") is None and cache.get("d1") == ALICE and cache.get("d3") == BOB and len(cache) == 2


def test_forget_drops_one_digest_or_all():
    cache = TenantCache(ttl_s=10, clock=Clock())
    cache.put("d1", ALICE)
    cache.put("d2", BOB)
    cache.forget("d1")
    assert cache.get("d1") is None and cache.get("d2") == BOB
    cache.forget()
    assert len(cache) == 0


def test_ttl_zero_turns_the_cache_off():
    cache = TenantCache(ttl_s=0, clock=Clock())
    cache.put("d1", ALICE)
    assert cache.get("d1") is None and len(cache) == 0


@pytest.fixture
def key_queries(api):
    """Counts SELECTs on api_keys the app's engine runs."""
    seen = []

    def count(_conn, _cursor, statement, *_args):
        if "api_keys" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    engine = api.app.state.services.db.engine
    event.listen(engine, "before_cursor_execute", count)
    yield seen
    event.remove(engine, "before_cursor_execute", count)


def test_a_known_key_is_looked_up_once_then_answered_from_the_cache(api, key_queries):
    for _ in range(3):
        assert api.client.get("/v1/files", headers=api.auth("alice")).status_code == 200
    assert len(key_queries) == 1


def test_a_key_deleted_in_the_database_works_until_forgotten_or_expired(api):
    """What revocation means with the cache: a removed key keeps working in a process that cached it
    until its entry expires (tenant_cache_ttl_s) or that process forgets it."""
    services = api.app.state.services
    assert api.client.get("/v1/files", headers=api.auth("alice")).status_code == 200
    with services.db.sessions() as session:
        session.execute(delete(ApiKey).where(ApiKey.key_sha256 == key_digest(api.keys["alice"])))
        session.commit()
    assert api.client.get("/v1/files", headers=api.auth("alice")).status_code == 200
    services.tenants.forget(key_digest(api.keys["alice"]))
    response = api.client.get("/v1/files", headers=api.auth("alice"))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_unknown_keys_are_not_cached_so_a_new_key_works_at_once(api):
    key = "lm-" + "k" * 43
    assert api.client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    with api.app.state.services.db.sessions() as session:
        tenant = session.query(Tenant).filter_by(name="bob").one()
        session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_sha256=key_digest(key), prefix=key[:10],
                           created_at=0))
        session.commit()
    assert api.client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_cached_tenants_stay_isolated(api):
    """Each key maps to its own tenant through the cache: bob still cannot see alice's file."""
    file_id = api.upload("alice", '{"text": "hello"}\n').json()["id"]
    for _ in range(2):
        assert api.client.get(f"/v1/files/{file_id}", headers=api.auth("alice")).status_code == 200
        assert api.client.get(f"/v1/files/{file_id}", headers=api.auth("bob")).status_code == 404
