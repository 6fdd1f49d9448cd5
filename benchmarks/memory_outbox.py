"""An in-memory stand-in for relayd's SQLite outbox: the relay with its store bypassed.

It implements the part of `relayd.store.Store` that the daemon uses (the supervisor opens it,
prunes and reads the backlog; watchers add rows and read and save their drive's state; dispatchers
claim, record, release and ask when the next row is due), with the same semantics, but keeps rows
in dicts and a heap: no thread, no SQL, no fsync. Nothing survives the process, so it is only for
measuring what the store costs (`benchmarks/relay_runner.py --memory` puts it in place of the real
one). When relayd's Store grows a method the daemon calls, add it here too: the relay-memory
pipeline (and tests/test_benchmarks.py) fails until then.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from relayd.store import (
    OUTBOX_FILE,
    AttemptResult,
    Backlog,
    Delivery,
    Fence,
    NewDelivery,
    OutboxError,
    Router,
    State,
)


@dataclass(slots=True)
class _Row:
    id: int
    message_id: str
    webhook: str
    drive: str
    body: bytes
    created: float
    retry_from: float
    state: State
    attempts: int
    next_attempt: float


class MemoryOutbox:
    """Same constructor and daemon-facing methods as `relayd.store.SqliteStore`."""

    kind = "memory"

    def __init__(
        self,
        path: Path,
        *,
        recover: bool = True,
        router: Router | None = None,
        clock: Callable[[], float] = time.time,
        disk_reserve: int = 0,
    ) -> None:
        self.path = path
        self._router = router
        # What the supervisor, /readyz and /metrics read off the real store: never full here.
        self.healthy, self.disk_full, self.failures = True, False, 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self._clock = clock
        self._rows: dict[int, _Row] = {}
        # Per webhook: (next_attempt, id) of pending rows. Entries go stale when a row changes
        # state; they are skipped when they reach the top (lazy deletion).
        self._due: dict[str, list[tuple[float, int]]] = {}
        self._inflight: dict[str, int] = {}
        self._drives: dict[str, tuple[str, str | None]] = {}  # name -> (resource, delta cursor)
        self._drive_ids: dict[str, tuple[str, str]] = {}  # name -> (resource, drive id)
        self._next_id = 1
        self._open = False
        self.commits = 0

    async def __aenter__(self) -> Self:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._open = False

    def _check(self) -> None:
        if not self._open:
            raise OutboxError(f"{self.path}: the outbox is closed")

    def _push(self, row: _Row) -> None:
        heapq.heappush(self._due.setdefault(row.webhook, []), (row.next_attempt, row.id))

    def _top(self, webhook: str) -> _Row | None:
        """The pending row that is due first, dropping stale heap entries on the way."""
        heap = self._due.get(webhook)
        while heap:
            due, row_id = heap[0]
            row = self._rows.get(row_id)
            if row is not None and row.state is State.PENDING and row.next_attempt == due:
                return row
            heapq.heappop(heap)
        return None

    def _oldest_pending(self, webhook: str) -> _Row | None:
        """For ordered webhooks: the head of the queue (a scan; ordered is not benchmarked)."""
        pending = (r for r in self._rows.values() if r.webhook == webhook)
        return min(
            (r for r in pending if r.state is State.PENDING), key=lambda r: r.id, default=None
        )

    def describe(self) -> str:
        return f"in memory (instead of {self.path})"

    async def add(self, deliveries: Sequence[NewDelivery], *, fence: Fence | None = None) -> None:
        self._check()
        if deliveries:
            self._insert(deliveries)

    def _insert(self, deliveries: Sequence[NewDelivery]) -> None:
        for d in deliveries:
            row = _Row(
                id=self._next_id,
                message_id=d.message_id,
                webhook=d.webhook,
                drive=d.drive,
                body=d.body,
                created=d.created,
                retry_from=d.created,
                state=State.PENDING,
                attempts=0,
                next_attempt=d.created,
            )
            self._next_id += 1
            self._rows[row.id] = row
            self._push(row)
        self.commits += 1
        if self._router is not None:
            # No hand-over at commit: claims cost nothing here anyway.
            for webhook in {d.webhook for d in deliveries}:
                self._router.wake(webhook)

    async def drive_state(self, name: str) -> tuple[str, str | None] | None:
        self._check()
        return self._drives.get(name)

    async def save_drive_state(
        self,
        name: str,
        resource: str,
        cursor: str | None,
        deliveries: Sequence[NewDelivery] = (),
        *,
        fence: Fence | None = None,
    ) -> None:
        self._check()
        self._drives[name] = (resource, cursor)
        if self._drive_ids.get(name, (resource,))[0] != resource:
            del self._drive_ids[name]
        if deliveries:
            self._insert(deliveries)
        else:
            self.commits += 1

    async def drive_id(self, name: str) -> tuple[str, str] | None:
        self._check()
        return self._drive_ids.get(name)

    async def save_drive_id(self, name: str, resource: str, drive_id: str) -> None:
        self._check()
        stored = self._drives.get(name)
        if stored is None or stored[0] != resource:
            self._drives[name] = (resource, None)
        self._drive_ids[name] = (resource, drive_id)
        self.commits += 1

    async def claim(self, webhook: str, limit: int, *, ordered: bool = False) -> list[Delivery]:
        self._check()
        now = self._clock()
        if ordered:
            if self._inflight.get(webhook, 0):
                return []
            pending = [
                r for r in self._rows.values() if r.webhook == webhook and r.state is State.PENDING
            ]
            head = min(pending, key=lambda r: r.id, default=None)
            rows = [head] if head is not None and head.next_attempt <= now else []
        else:
            rows = []
            while len(rows) < limit:
                row = self._top(webhook)
                if row is None or row.next_attempt > now:
                    break
                heapq.heappop(self._due[webhook])
                rows.append(row)
        for row in rows:
            row.state = State.INFLIGHT
        self._inflight[webhook] = self._inflight.get(webhook, 0) + len(rows)
        return [
            Delivery(
                id=r.id,
                message_id=r.message_id,
                webhook=r.webhook,
                drive=r.drive,
                body=r.body,
                created=r.created,
                retry_from=r.retry_from,
                attempts=r.attempts,
            )
            for r in rows
        ]

    async def next_due(
        self, webhook: str, *, ordered: bool = False, horizon: float | None = None
    ) -> float | None:
        # `horizon` is ignored: nothing here outlives the process, so no row can date from a
        # clock that was later corrected.
        self._check()
        if ordered:
            if self._inflight.get(webhook, 0):
                return None
            pending = [
                r for r in self._rows.values() if r.webhook == webhook and r.state is State.PENDING
            ]
            head = min(pending, key=lambda r: r.id, default=None)
            return None if head is None else head.next_attempt
        row = self._top(webhook)
        return None if row is None else row.next_attempt

    async def record(self, results: Iterable[AttemptResult]) -> None:
        self._check()
        for result in results:
            row = self._rows.get(result.id)
            if row is None:
                continue
            if row.state is State.INFLIGHT:
                self._inflight[row.webhook] -= 1
            row.attempts += 1
            row.state = result.state
            if result.state is State.DELIVERED:
                del self._rows[row.id]  # no history kept: that is the store's job
            elif result.state is State.PENDING:
                row.next_attempt = (
                    result.next_attempt if result.next_attempt is not None else result.attempted_at
                )
                self._push(row)

    async def release(self, ids: Iterable[int]) -> None:
        self._check()
        for row_id in ids:
            row = self._rows.get(row_id)
            if row is not None and row.state is State.INFLIGHT:
                self._inflight[row.webhook] -= 1
                row.state = State.PENDING
                self._push(row)

    async def prune(self, delivered_before: float) -> int:
        self._check()
        return 0  # delivered rows are dropped as soon as they are recorded

    async def backlog(self) -> Backlog:
        self._check()
        counts: dict[str, int] = {}
        oldest: dict[str, float] = {}
        per_drive: dict[str, int] = {}
        for row in self._rows.values():
            if row.state in (State.PENDING, State.INFLIGHT):
                counts[row.webhook] = counts.get(row.webhook, 0) + 1
                oldest[row.webhook] = min(oldest.get(row.webhook, row.created), row.created)
                per_drive[row.drive] = per_drive.get(row.drive, 0) + 1
        return Backlog(counts=counts, oldest=oldest, per_drive=per_drive)


def open_memory_store(
    url: str | None,
    state_dir: Path,
    *,
    recover: bool,
    router: Router | None = None,
    replica: str | None = None,
    disk_reserve: int = 0,
    clock: Callable[[], float] = time.time,
) -> MemoryOutbox:
    """`relayd.store.open_store`'s stand-in: what `relay_runner.py --memory` patches in as
    `relayd.supervisor.open_store`, the name the supervisor opens its store with."""
    return MemoryOutbox(state_dir / OUTBOX_FILE, recover=recover, router=router, clock=clock)
