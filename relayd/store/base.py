"""What every store is: the types callers see, and `Store`, the interface both backends give.

The daemon, the dispatchers, the delta cursor and the CLI hold a `Store` and never know which
backend is behind it: SQLite (`relayd.store.sqlite`, one process per state_dir, the default) or
PostgreSQL (`relayd.store.postgres`, any number of replicas on one database).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, Protocol, Self

StoreKind = Literal["sqlite", "postgresql"]


class State(StrEnum):
    PENDING = "pending"
    INFLIGHT = "inflight"
    DELIVERED = "delivered"
    DEAD = "dead"


class OutboxError(Exception):
    """The store cannot be used (corrupt, unwritable, closed, unreachable). The message names the
    file or the server (never a password)."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class OutboxFull(OutboxError):
    """The disk under the store is full: new notifications wait until there is room again.

    Raised at once, without touching the disk: what space is left (and the reserve the outbox
    gave up) goes to delivering what is already stored.
    """


@dataclass(frozen=True)
class Fence:
    """The lease a write is made under: the store writes only while `holder` still holds
    `resource` at `epoch` (the fencing token), so a replica that lost a drive to another can
    never advance its cursor or add its rows after the take-over."""

    resource: str  # "drive:" + the drive's name
    holder: str  # the replica's name
    epoch: int


class Fenced(OutboxError):
    """The write's fence no longer holds (another replica took the resource over, or the lease
    expired): nothing of the operation was written."""


@dataclass(frozen=True)
class NewDelivery:
    message_id: str
    webhook: str
    drive: str
    body: bytes
    created: float


@dataclass(frozen=True)
class Delivery:
    """A claimed row: what a dispatcher needs to make one attempt."""

    id: int
    message_id: str
    webhook: str
    drive: str
    body: bytes
    created: float
    retry_from: float
    attempts: int  # attempts made before this one


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt came to, and what happens to the row next."""

    id: int
    state: State  # DELIVERED, DEAD, or PENDING again for a retry
    attempted_at: float
    next_attempt: float | None = None
    status: int | None = None
    error: str | None = None
    latency: float | None = None
    response: str | None = None


@dataclass(frozen=True)
class Filter:
    """Selects rows for `outbox status|list|replay|purge`. Empty fields select everything."""

    webhook: str | None = None
    drive: str | None = None
    state: State | None = None
    since: float | None = None  # created at or after (Unix seconds)
    until: float | None = None  # created before
    ids: tuple[int, ...] = ()  # these rows only

    @property
    def narrows(self) -> bool:
        """Whether it picks rows out at all (a state alone still reaches every webhook)."""
        return any(
            value is not None for value in (self.webhook, self.drive, self.since, self.until)
        ) or bool(self.ids)

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.ids:
            clauses.append(f"id IN ({', '.join('?' * len(self.ids))})")
            params.extend(self.ids)
        for column, value in (("webhook", self.webhook), ("drive", self.drive)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.state is not None:
            clauses.append("state = ?")
            params.append(self.state.value)
            if self.state in (State.DELIVERED, State.DEAD):
                clauses.append("finished IS NOT NULL")  # always true: lets deliveries_done serve
        if self.since is not None:
            clauses.append("created >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("created < ?")
            params.append(self.until)
        return (" AND ".join(clauses) or "1"), params


EVERYTHING = Filter()  # the default selection: every row
REPLAYABLE = (State.DEAD, State.PENDING)  # what `replay` reaches: dead rows unless asked
RESENDABLE = (
    State.DELIVERED,
    State.DEAD,
)  # what `resend` reaches: finished rows, both unless asked


@dataclass(frozen=True)
class Backlog:
    """What waits in the outbox: rows per webhook (and the oldest one's creation time), rows
    per drive that produced them, and dead letters per webhook."""

    counts: dict[str, int] = field(default_factory=dict)
    oldest: dict[str, float] = field(default_factory=dict)
    per_drive: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """Counts per (webhook, state), and the oldest pending row's creation time per webhook."""

    counts: dict[tuple[str, State], int]
    oldest_pending: dict[str, float]

    def backlog(self, webhook: str) -> int:
        return self.counts.get((webhook, State.PENDING), 0) + self.counts.get(
            (webhook, State.INFLIGHT), 0
        )


class Reservation(Protocol):
    """Room one dispatcher set aside for new rows of a commit under way.

    It is bound to the dispatcher that made it, not to a webhook's name: a reload may replace
    the webhook's dispatcher while the commit runs, and the rows must not go to a dispatcher
    that never saw the reservation, nor to one that has stopped.
    """

    @property
    def count(self) -> int:
        """How many of the rows offered the dispatcher takes (1 or more)."""
        ...

    def hand_over(self, rows: list[Delivery]) -> bool:
        """The reserved rows, committed and in flight, or [] if the commit failed. Called
        exactly once. False: the dispatcher has stopped and took none of them."""
        ...


class Router(Protocol):
    """Where new rows go once committed: the dispatchers, through the supervisor.

    A dispatcher with room takes new rows straight from the commit (`reserve`, then the
    reservation's `hand_over`): they are inserted already in flight, so no claim has to read
    them back. The rest are inserted waiting, and the dispatcher is woken to claim them when it
    has room. Rows a stopped dispatcher refuses go back to waiting, and its webhook is woken.
    """

    def reserve(self, webhook: str, count: int) -> Reservation | None:
        """Room for up to `count` new rows in the webhook's dispatcher, or None for none."""
        ...

    def wake(self, webhook: str) -> None:
        """Rows are waiting in the store for the webhook's dispatcher to claim."""
        ...


@dataclass
class InsertPlan:
    """New rows split into those handed straight to a dispatcher and those left waiting."""

    claimed: list[tuple[Reservation, list[NewDelivery]]]
    waiting: list[NewDelivery]

    @classmethod
    def plan(cls, deliveries: Sequence[NewDelivery], router: Router | None) -> InsertPlan:
        by_webhook: dict[str, list[NewDelivery]] = {}
        for delivery in deliveries:
            by_webhook.setdefault(delivery.webhook, []).append(delivery)
        claimed: list[tuple[Reservation, list[NewDelivery]]] = []
        waiting: list[NewDelivery] = []
        for webhook, rows in by_webhook.items():
            reservation = router.reserve(webhook, len(rows)) if router is not None else None
            taken = 0 if reservation is None else max(0, min(reservation.count, len(rows)))
            if reservation is not None:
                claimed.append((reservation, rows[:taken]))
            waiting += rows[taken:]
        return cls(claimed, waiting)

    def announce(
        self, router: Router | None, handed: list[list[Delivery]] | None
    ) -> list[Delivery]:
        """After the commit (handed) or its failure (None): tell the dispatchers. Returns the
        rows a stopped dispatcher refused: committed in flight, and nobody's until put back."""
        refused: list[Delivery] = []
        for index, (reservation, _) in enumerate(self.claimed):
            rows = handed[index] if handed is not None else []
            if not reservation.hand_over(rows):
                refused += rows
        if router is not None and handed is not None:
            for webhook in {d.webhook for d in self.waiting}:
                router.wake(webhook)
        return refused


class Store(Protocol):
    """What callers need from a store, whichever backend it is.

    `async with store:` opens it (and its writer); `close()` commits what is queued first.
    """

    kind: StoreKind
    # Health, for /readyz, /status and the metrics.
    disk_full: bool  # new notifications are refused until there is room again (SQLite only)
    failures: int  # commits that failed: the relayd_outbox_errors metric
    last_error: str | None  # the latest failure, log-safe (names the file or the server)
    failing_since: float | None  # since when every commit fails, if they do
    commits: int  # transactions committed: one per group of operations

    @property
    def healthy(self) -> bool:
        """The store takes new notifications: there is room and the last commit worked."""
        ...

    def describe(self) -> str:
        """Where the store is, safe to log: the file's path, or the URL without its password."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def close(self) -> None: ...

    # -- the daemon's operations ----------------------------------------------------------------

    async def add(self, deliveries: Sequence[NewDelivery], *, fence: Fence | None = None) -> None:
        """Returns once the rows are committed: safe from a killed relayd (SQLite syncs them to
        disk right after, beside its writer; PostgreSQL's commit has synced them)."""
        ...

    async def claim(self, webhook: str, limit: int, *, ordered: bool = False) -> list[Delivery]: ...

    async def next_due(
        self, webhook: str, *, ordered: bool = False, horizon: float | None = None
    ) -> float | None: ...

    async def record(self, results: Iterable[AttemptResult]) -> None: ...

    async def release(self, ids: Iterable[int]) -> None: ...

    async def prune(self, delivered_before: float) -> int: ...

    async def backlog(self) -> Backlog: ...

    async def drive_state(self, name: str) -> tuple[str, str | None] | None: ...

    async def save_drive_state(
        self,
        name: str,
        resource: str,
        cursor: str | None,
        deliveries: Sequence[NewDelivery] = (),
        *,
        fence: Fence | None = None,
    ) -> None: ...

    async def drive_id(self, name: str) -> tuple[str, str] | None: ...

    async def save_drive_id(self, name: str, resource: str, drive_id: str) -> None: ...

    # -- inspection and repair (the `relayd outbox` commands) -----------------------------------

    async def summary(self, selection: Filter = EVERYTHING) -> Summary: ...

    async def row(self, row_id: int) -> dict[str, Any] | None: ...

    async def names(self) -> tuple[set[str], set[str]]: ...

    async def rows(
        self, selection: Filter = EVERYTHING, *, limit: int = 100
    ) -> list[dict[str, Any]]: ...

    async def replay(self, selection: Filter, *, dry_run: bool = False) -> int: ...

    async def resend(self, selection: Filter, *, dry_run: bool = False) -> int: ...

    async def purge(self, selection: Filter, *, dry_run: bool = False) -> int: ...


def result_rows(results: Sequence[AttemptResult]) -> list[tuple[Any, ...]]:
    """Each result as the row update both stores make: (state, next_attempt, last_attempt,
    last_status, last_error, last_latency, last_response, finished, id)."""
    return [
        (
            r.state.value,
            r.next_attempt if r.next_attempt is not None else r.attempted_at,
            r.attempted_at,
            r.status,
            r.error,
            r.latency,
            r.response,
            r.attempted_at if r.state in (State.DELIVERED, State.DEAD) else None,
            r.id,
        )
        for r in results
    ]


def failed_attempt_rows(results: Sequence[AttemptResult]) -> list[tuple[Any, ...]]:
    """The attempts table's rows for the results that were not a delivery (a successful
    attempt is recorded on its row alone): (delivery_id, at, status, error, latency, response)."""
    return [
        (r.id, r.attempted_at, r.status, r.error, r.latency, r.response)
        for r in results
        if r.state is not State.DELIVERED
    ]


def with_attempt_log(row: dict[str, Any], failed: list[dict[str, Any]]) -> dict[str, Any]:
    """`relayd outbox show`'s row: its failed attempts, then the delivery itself (which the
    attempts table does not hold: a success is recorded on the row alone)."""
    attempts = list(failed)
    if row["state"] == State.DELIVERED.value and row["last_attempt"] is not None:
        attempts.append(
            {
                "at": row["last_attempt"],
                "status": row["last_status"],
                "error": row["last_error"],
                "latency": row["last_latency"],
                "response": row["last_response"],
            }
        )
    row["attempt_log"] = attempts
    return row
