"""The queue both stores' writers take their group commits from (pure asyncio, no I/O).

Operations queue up while a commit is under way, and the next commit takes all of them in one
transaction, so a commit's cost (an fsync, a round trip to the server) is shared by every
notification, claim and result that arrived meanwhile. An operation nobody waits on (an attempt
result) may wait a few milliseconds for company rather than take a commit of its own.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

__all__ = ["DEFER_MAX", "DEFER_SECONDS", "CommitQueue"]

Q = TypeVar("Q")

# A deferrable operation waits this long (or for this many to queue, or for any other operation)
# to share a commit.
DEFER_SECONDS = 0.005
DEFER_MAX = 32


class CommitQueue(Generic[Q]):
    """What the next commit takes, and when it should start; one writer task reads it."""

    def __init__(self) -> None:
        self.items: list[Q] = []
        self.closing = False  # no more operations: the writer drains the queue, then ends
        self._wake = asyncio.Event()
        self._now = False  # the queue holds an operation that should not wait
        self._timer: asyncio.TimerHandle | None = None  # ends a deferred operation's wait

    def put(self, item: Q, *, deferrable: bool = False) -> None:
        self.items.append(item)
        if not deferrable or len(self.items) >= DEFER_MAX:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(DEFER_SECONDS, self.flush)

    def flush(self) -> None:
        """Commit what is queued as soon as the writer can."""
        self._now = True
        self._wake.set()

    def close(self) -> None:
        self.closing = True
        self._wake.set()

    async def next_batch(self) -> list[Q] | None:
        """The operations of the next commit, once one is due; None once closed and drained."""
        while True:
            if not self.items and self.closing:
                return None
            if self.items and (self._now or self.closing):
                break
            await self._wake.wait()
            self._wake.clear()
        self._now = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self.items = self.items, []
        return batch
