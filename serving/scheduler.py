"""Fair admission of waiting requests: per-user, then per-adapter queues, start-time fair queuing.

Every user (the OpenAI `user` field; absent: one shared user) and, within a user, every adapter has a
virtual time: the number of requests admitted for it, and a newcomer starts at the current virtual
time, not at zero, so idling earns no credit. Candidates come out ordered by user virtual time, then
adapter virtual time, then arrival: a user with 1000 queued requests and one with 1 alternate, and
within a user, adapters alternate (LoRAX's per-adapter queues). The engine skips an adapter queue
whose head cannot be admitted now (no slot for its adapter); its other requests cannot be either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class _Lane:
    """A FIFO of one adapter's waiting requests within one user."""

    vtime: int
    queue: deque = field(default_factory=deque)


@dataclass
class _User:
    vtime: int
    lanes: dict[object, _Lane] = field(default_factory=dict)
    lane_clock: int = 0  # the user's adapter-level virtual time

    def waiting(self) -> int:
        return sum(len(lane.queue) for lane in self.lanes.values())


class FairQueue:
    """Waiting requests. Items need `.user` (str) and `.adapter_key` (hashable); `.arrival` orders ties."""

    def __init__(self):
        self.users: dict[str, _User] = {}
        self.clock = 0  # global virtual time: the lowest user virtual time at the last admission
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, item) -> None:
        user = self.users.get(item.user)
        if user is None:
            user = self.users[item.user] = _User(self.clock)
        elif not user.lanes:
            user.vtime = max(user.vtime, self.clock)
        lane = user.lanes.get(item.adapter_key)
        if lane is None:
            lane = user.lanes[item.adapter_key] = _Lane(user.lane_clock)
        lane.queue.append(item)
        self.size += 1

    def heads(self) -> Iterator:
        """The head of every lane, fairest first."""
        users = sorted(((u.vtime, min(lane.queue[0].arrival for lane in u.lanes.values()), name)
                        for name, u in self.users.items() if u.lanes))
        for _, _, name in users:
            user = self.users[name]
            for _, _, key in sorted((lane.vtime, lane.queue[0].arrival, key) for key, lane in user.lanes.items()):
                yield user.lanes[key].queue[0]

    def admitted(self, item) -> None:
        """Remove the head `item` and charge its user and lane one request."""
        user = self.users[item.user]
        lane = user.lanes[item.adapter_key]
        lane.queue.popleft()
        self.size -= 1
        self.clock = max(self.clock, user.vtime)
        user.vtime += 1
        user.lane_clock = max(user.lane_clock, lane.vtime)
        lane.vtime += 1
        self._prune(item.user, item.adapter_key)

    def remove(self, item) -> bool:
        """Take out a waiting item (an abort); False if it is not here."""
        user = self.users.get(item.user)
        lane = user.lanes.get(item.adapter_key) if user else None
        if lane is None or item not in lane.queue:
            return False
        lane.queue.remove(item)
        self.size -= 1
        self._prune(item.user, item.adapter_key)
        return True

    def remove_adapter(self, key) -> list:
        """Take out every waiting item of one adapter (its weights could not be read)."""
        items = [item for user in self.users.values() if key in user.lanes for item in user.lanes[key].queue]
        for item in items:
            self.remove(item)
        return items

    def _prune(self, user_name: str, key) -> None:
        user = self.users[user_name]
        if not user.lanes[key].queue:
            del user.lanes[key]
        if not user.lanes and user.vtime <= self.clock:
            del self.users[user_name]  # it would restart at the clock anyway
