"""This replica's rows in PostgreSQL: its heartbeat in `replicas`, its leases in `leases`.

The coordinator has a connection of its own (asyncpg), apart from the store's pool, so that a
store busy with a burst never delays a renewal. Every time is the database's clock
(`clock_timestamp()`): replicas never compare their own clocks with each other. What a replica
knows of its own leases it judges by its *monotonic* clock from the moment it sent the statement
that set them: the database set `expires` to its now + lease, and its now was no earlier than
that moment, so the lease lasts at least until sent + lease on our clock (`LeaseClock`).

A statement that does not answer in time (a frozen network) is abandoned and the connection
dropped (asyncpg's `terminate`, which never waits); the next call connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from relayd.store.base import Fence

__all__ = [
    "CHANNEL",
    "Coordinator",
    "CoordinatorError",
    "Heartbeat",
    "LeaseRow",
    "ReplicaRow",
]

# NOTIFY channel: a replica that joins, leaves or releases a lease says so here, and the others
# place again at once rather than at their next heartbeat.
CHANNEL = "relayd_cluster"
# Rows of replicas gone for this long are removed by whoever heartbeats: /status shows a dead
# replica for a while (an operator wants to see what died), not forever.
FORGET_AFTER = 3600.0

# The tables (`replicas`, `leases`) are created by the store's migrations (relayd.store.postgres).

# The heartbeat is one statement (so one round trip, and never a transaction left open between
# statements by a replica that stalls): this replica's row, the renewal of its leases by resource
# and epoch (a lease taken over is never renewed by its old holder), the forgetting of long-dead
# rows, and the live replicas. Data-modifying CTEs are not seen by the rest of the statement, so
# the live list is as of just before this heartbeat: this replica may be missing from it (its
# first beat), which the placement allows for.
_BEAT = """
WITH me AS (
    INSERT INTO replicas (name, started, heartbeat, expires, info)
    VALUES ($1, clock_timestamp(), clock_timestamp(),
            clock_timestamp() + $2 * interval '1 second', $3::jsonb)
    ON CONFLICT (name) DO UPDATE SET
        started = CASE WHEN $4 THEN EXCLUDED.started ELSE replicas.started END,
        heartbeat = EXCLUDED.heartbeat, expires = EXCLUDED.expires, info = EXCLUDED.info
    RETURNING 1
), renewed AS (
    UPDATE leases SET expires = clock_timestamp() + $2 * interval '1 second'
    WHERE holder = $1 AND expires > clock_timestamp()
      AND (resource, epoch) IN (SELECT * FROM unnest($5::text[], $6::bigint[]))
    RETURNING resource, epoch
), forgotten AS (
    DELETE FROM replicas
    WHERE expires < clock_timestamp() - $7 * interval '1 second' AND name <> $1
    RETURNING 1
)
SELECT 'lease' AS kind, resource AS name, epoch, NULL::float8 AS remaining FROM renewed
UNION ALL
SELECT 'replica', name, NULL, extract(epoch FROM expires - clock_timestamp())::float8
FROM replicas WHERE expires > clock_timestamp() AND name <> $1
UNION ALL
SELECT 'me', $1, NULL, NULL FROM me
UNION ALL
SELECT 'forgotten', NULL, NULL, NULL FROM forgotten
"""
# Free (released), expired, or never held: take it with the next epoch. A lease this replica
# name still holds is not taken again: it may be an earlier process of the same name whose
# lease has not run out, and its fence must stay distinct from ours.
_ACQUIRE = """
INSERT INTO leases (resource, holder, epoch, acquired, expires)
VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + $3 * interval '1 second')
ON CONFLICT (resource) DO UPDATE SET
    holder = EXCLUDED.holder, epoch = leases.epoch + 1,
    acquired = EXCLUDED.acquired, expires = EXCLUDED.expires
WHERE leases.holder IS NULL OR leases.expires <= clock_timestamp()
RETURNING epoch
"""
_ACQUIRE_MANY = """
INSERT INTO leases (resource, holder, epoch, acquired, expires)
SELECT resource, $2, 1, clock_timestamp(), clock_timestamp() + $3 * interval '1 second'
FROM unnest($1::text[]) AS resource
ON CONFLICT (resource) DO UPDATE SET
    holder = EXCLUDED.holder, epoch = leases.epoch + 1,
    acquired = EXCLUDED.acquired, expires = EXCLUDED.expires
WHERE leases.holder IS NULL OR leases.expires <= clock_timestamp()
RETURNING resource, epoch
"""
# Leases taken per statement: a replica starting with thousands of drives takes them in a few
# round trips, and a statement held up by one busy row (lock_timeout) delays only its batch.
ACQUIRE_BATCH = 500
# Release and leave say so on CHANNEL in the same statement (NOTIFY is sent at its commit).
_RELEASE = """
WITH released AS (
    UPDATE leases SET holder = NULL, expires = clock_timestamp()
    WHERE holder = $1 AND (resource, epoch) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))
    RETURNING 1
)
SELECT pg_notify($4, $1), (SELECT count(*) FROM released)
"""
_LEAVE = """
WITH gone AS (UPDATE replicas SET expires = clock_timestamp() WHERE name = $1 RETURNING 1)
SELECT pg_notify($2, $1), (SELECT count(*) FROM gone)
"""


class CoordinatorError(Exception):
    """PostgreSQL could not be reached or did not answer in time. Safe to log."""


@dataclass(frozen=True)
class ReplicaRow:
    """A replica as /status shows it (times are Unix seconds, the database's clock)."""

    name: str
    started: float
    heartbeat: float
    expires: float
    alive: bool
    info: Mapping[str, Any]


@dataclass(frozen=True)
class LeaseRow:
    resource: str
    holder: str | None
    epoch: int
    acquired: float
    expires: float
    valid: bool


@dataclass(frozen=True)
class Heartbeat:
    """What one heartbeat learnt: the live replicas, and which of our leases were renewed
    (`sent`: our monotonic clock when the statement went out)."""

    live: tuple[str, ...]
    renewed: frozenset[Fence]
    sent: float
    # Seconds until the first other live replica's row expires, as the database saw it (None:
    # no other): a replica that died is dropped from the ring at that moment, not a round later.
    next_expiry: float | None = None


@dataclass
class Coordinator:
    """Heartbeats and leases of replica `replica`; `lease` in seconds."""

    url: str
    replica: str
    lease: float
    info: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 5.0  # for each statement (the caller bounds it further)
    on_change: Callable[[], None] | None = None  # a NOTIFY on CHANNEL from another replica
    clock: Callable[[], float] = time.monotonic
    _conn: asyncpg.Connection | None = field(default=None, init=False, repr=False)
    _first_beat: bool = field(default=True, init=False)

    # -- connection ------------------------------------------------------------------------------

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        try:
            conn = await asyncpg.connect(
                self.url, timeout=self.timeout, server_settings=self._session_settings()
            )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise CoordinatorError(f"cannot connect to PostgreSQL: {_describe(exc)}") from None
        if self.on_change is not None:
            await conn.add_listener(CHANNEL, self._notified)
        self._conn = conn
        return conn

    def _session_settings(self) -> dict[str, str]:
        """Every statement of the coordinator is a transaction of its own (one round trip), so
        a replica cut off never leaves a transaction open with lease rows locked against the
        others; idle_in_transaction_session_timeout is the safety net should one ever be
        (otherwise they would wait until TCP gives up, minutes later). Waiting for a lock is
        bounded too: a busy lease is tried again at the next round."""
        idle = max(1.0, self.lease / 6)
        return {
            "application_name": f"relayd-cluster {self.replica}"[:63],
            "idle_in_transaction_session_timeout": str(int(idle * 1000)),
            "lock_timeout": str(int(idle * 1000)),
        }

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload != self.replica and self.on_change is not None:
            self.on_change()

    def describe(self) -> str:
        """Where the coordinator connects, for logs: the URL without its password."""
        return redact_url(self.url)

    async def _run(self, timeout: float | None, work: Callable[[asyncpg.Connection], Any]) -> Any:
        """Run `work` on the connection within `timeout` (or self.timeout): on any failure the
        connection is dropped without waiting, and CoordinatorError raised."""
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                conn = await self._connection()
                return await work(conn)
        except CoordinatorError:
            raise
        except asyncio.CancelledError:
            self._drop()  # a statement cut short leaves the connection unusable
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            self._drop()
            raise CoordinatorError(f"PostgreSQL: {_describe(exc)}") from None

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await self._conn.close()
            self._drop()

    # -- heartbeat and leases --------------------------------------------------------------------

    async def beat(self, held: Collection[Fence], *, timeout: float | None = None) -> Heartbeat:
        """Heartbeat, renew every lease in `held` that is still ours, list the live replicas
        (this one among them): one statement."""
        resources = [fence.resource for fence in held]
        epochs = [fence.epoch for fence in held]
        info = json.dumps(dict(self.info))
        sent = self.clock()

        async def work(conn: asyncpg.Connection) -> Heartbeat:
            rows = await conn.fetch(
                _BEAT,
                self.replica,
                self.lease,
                info,
                self._first_beat,
                resources,
                epochs,
                FORGET_AFTER,
            )
            renewed = frozenset(
                Fence(row["name"], self.replica, int(row["epoch"]))
                for row in rows
                if row["kind"] == "lease"
            )
            others = {
                row["name"]: float(row["remaining"]) for row in rows if row["kind"] == "replica"
            }
            return Heartbeat(
                tuple(sorted({*others, self.replica})),
                renewed,
                sent,
                min(others.values()) if others else None,
            )

        result: Heartbeat = await self._run(timeout, work)
        self._first_beat = False
        return result

    async def acquire(
        self, resource: str, *, timeout: float | None = None
    ) -> tuple[Fence, float] | None:
        """Take `resource` if it is free or expired: its Fence (the new epoch) and the
        monotonic time the statement was sent; None while another replica holds it."""
        sent = self.clock()

        async def work(conn: asyncpg.Connection) -> Any:
            try:
                return await conn.fetchval(_ACQUIRE, resource, self.replica, self.lease)
            except asyncpg.LockNotAvailableError:
                return None  # its holder is writing (or cut off mid-renewal): next round

        epoch = await self._run(timeout, work)
        return None if epoch is None else (Fence(resource, self.replica, int(epoch)), sent)

    async def acquire_many(
        self, resources: Sequence[str], *, timeout: float | None = None
    ) -> tuple[list[Fence], float]:
        """Take every lease in `resources` that is free or expired, in one statement: the
        Fences taken (the others are held by another replica) and when it was sent. A busy row
        (its holder writing, or cut off mid-renewal) makes the batch take nothing this time."""
        sent = self.clock()

        async def work(conn: asyncpg.Connection) -> list[Any]:
            try:
                return list(
                    await conn.fetch(_ACQUIRE_MANY, list(resources), self.replica, self.lease)
                )
            except asyncpg.LockNotAvailableError:
                return []

        rows = await self._run(timeout, work)
        return [Fence(row["resource"], self.replica, int(row["epoch"])) for row in rows], sent

    async def release(self, fences: Collection[Fence], *, timeout: float | None = None) -> None:
        """Give leases up at once (drain-then-take, SIGTERM), and tell the others."""
        if not fences:
            return
        resources = [fence.resource for fence in fences]
        epochs = [fence.epoch for fence in fences]

        async def work(conn: asyncpg.Connection) -> None:
            await conn.execute(_RELEASE, self.replica, resources, epochs, CHANNEL)

        await self._run(timeout, work)

    async def leave(self, *, timeout: float | None = None) -> None:
        """This replica stops: its row expires now, so the others' rings drop it at once."""

        async def work(conn: asyncpg.Connection) -> None:
            await conn.execute(_LEAVE, self.replica, CHANNEL)

        await self._run(timeout, work)

    async def announce(self, *, timeout: float | None = None) -> None:
        """Tell the others this replica is here (after its first heartbeat): they place again."""

        async def work(conn: asyncpg.Connection) -> None:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.replica)

        await self._run(timeout, work)

    # -- the cluster view ------------------------------------------------------------------------

    async def view(
        self, resources: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> tuple[list[ReplicaRow], list[LeaseRow]]:
        """Every replica row, and the lease rows (of `resources`, or all)."""

        async def work(conn: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
            replicas = await conn.fetch(
                "SELECT name, started, heartbeat, expires, info::text AS info,"
                " expires > clock_timestamp() AS alive FROM replicas ORDER BY name"
            )
            if resources is None:
                leases = await conn.fetch(
                    "SELECT *, expires > clock_timestamp() AND holder IS NOT NULL AS valid"
                    " FROM leases ORDER BY resource"
                )
            else:
                leases = await conn.fetch(
                    "SELECT *, expires > clock_timestamp() AND holder IS NOT NULL AS valid"
                    " FROM leases WHERE resource = ANY($1::text[]) ORDER BY resource",
                    list(resources),
                )
            return replicas, leases

        replicas, leases = await self._run(timeout, work)
        return (
            [
                ReplicaRow(
                    name=row["name"],
                    started=_seconds(row["started"]),
                    heartbeat=_seconds(row["heartbeat"]),
                    expires=_seconds(row["expires"]),
                    alive=bool(row["alive"]),
                    info=json.loads(row["info"]),
                )
                for row in replicas
            ],
            [
                LeaseRow(
                    resource=row["resource"],
                    holder=row["holder"],
                    epoch=int(row["epoch"]),
                    acquired=_seconds(row["acquired"]),
                    expires=_seconds(row["expires"]),
                    valid=bool(row["valid"]),
                )
                for row in leases
            ],
        )


def redact_url(url: str) -> str:
    """A postgresql:// URL without its password (nor its query, which may carry one)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _seconds(value: datetime) -> float:
    return value.timestamp()


def _describe(exc: BaseException) -> str:
    """An error for a log line: asyncpg's messages never carry the URL or its password."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
