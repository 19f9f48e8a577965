"""Fair admission order (`serving.scheduler.FairQueue`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from serving.scheduler import FairQueue

_arrivals = itertools.count()


@dataclass(eq=False)
class Item:
    user: str
    adapter_key: int
    arrival: int = field(default_factory=lambda: next(_arrivals))


def _drain(queue: FairQueue, n: int) -> list[Item]:
    out = []
    for _ in range(n):
        head = next(queue.heads())
        queue.admitted(head)
        out.append(head)
    return out


def test_a_flood_does_not_starve_a_late_user():
    queue = FairQueue()
    for _ in range(100):
        queue.push(Item("flood", 1))
    _drain(queue, 10)
    for _ in range(5):
        queue.push(Item("late", 2))
    order = [item.user for item in _drain(queue, 10)]
    assert order.count("late") == 5 and order[:2] in (["late", "flood"], ["flood", "late"])


def test_adapters_alternate_within_a_user_and_idling_earns_no_credit():
    queue = FairQueue()
    for _ in range(6):
        queue.push(Item("u", 1))
    for _ in range(3):
        queue.push(Item("u", 2))
    assert [i.adapter_key for i in _drain(queue, 6)] == [1, 2, 1, 2, 1, 2]
    for _ in range(4):
        queue.push(Item("v", 3))
    _drain(queue, 3)  # v, and u and v alternate from the current virtual time on
    queue.push(Item("idle", 4))
    first_four = [i.user for i in _drain(queue, 4)]
    assert first_four.count("idle") == 1, "a newcomer joins at the current virtual time, not ahead of everyone"


def test_equal_users_alternate_and_remove_takes_a_request_out():
    queue = FairQueue()
    items = [Item(user, 1) for _ in range(4) for user in ("a", "b", "c", "d")]
    for item in items:
        queue.push(item)
    assert queue.remove(items[0]) and not queue.remove(items[0])
    order = [i.user for i in _drain(queue, 15)]
    for k in range(0, 12, 4):
        assert sorted(order[k:k + 4]) == ["a", "b", "c", "d"] or k == 0
    assert len(queue) == 0
