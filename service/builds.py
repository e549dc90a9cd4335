"""Room for background work in one replica: at most `limit` jobs run at once, the others wait their
turn in order and know their place.

    turn = slots.join(key)      # None: runs now; else a future that resolves when its turn comes
    ...                         # (await turn), the work
    slots.leave(key)            # when it ends, however it ends: the next in line runs
    slots.place(key)            # 1 for the next to run, 2 after it, ...; None when running

`join` is synchronous, so a job is running or queued from the moment it is made, and its status
says which. `leave` may be called more than once for a job (when it is stopped, and as it ends): a
key is the job itself, never reused. Label-set builds use it (`clipserve.service.labelsets`): a replica asked for many large sets at
once builds `labelset_builds` of them and queues the rest, instead of splitting its text tower
between them all.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable


class BuildSlots:
    def __init__(self, limit: int):
        self.limit = limit
        self._running: set[Hashable] = set()
        self._waiting: collections.OrderedDict[Hashable, asyncio.Future[None]] = collections.OrderedDict()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def join(self, key: Hashable) -> asyncio.Future[None] | None:
        """Take a slot for `key` now (None), or a place at the end of the queue: a future that
        resolves once a slot is handed over to it."""
        if len(self._running) < self.limit and not self._waiting:
            self._running.add(key)
            return None
        turn = asyncio.get_running_loop().create_future()
        self._waiting[key] = turn
        return turn

    def leave(self, key: Hashable) -> None:
        """`key` is done (or gave up waiting): its slot or its place goes to the next in line."""
        turn = self._waiting.pop(key, None)
        if turn is not None:
            turn.cancel()
            return
        self._running.discard(key)
        while self._waiting and len(self._running) < self.limit:
            following, turn = self._waiting.popitem(last=False)
            self._running.add(following)
            turn.set_result(None)

    def place(self, key: Hashable) -> int | None:
        """1-based place of `key` among those waiting; None when it runs or is not known here."""
        for place, waiting in enumerate(self._waiting, start=1):
            if waiting == key:
                return place
        return None
