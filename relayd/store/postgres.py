"""The PostgreSQL store: the same promise as SQLite's, on a database any number of replicas share.

A notification is committed (synchronous_commit on) before anything else happens to it, as the
exact body bytes every attempt POSTs. One writer task owns one connection and commits in groups,
as the SQLite store does: operations queued while a commit runs share the next transaction, and
one that fails is undone alone (the batch runs again with a savepoint around each). A group with
nothing durable in it (claims, attempt results) commits with synchronous_commit off: losing one
of those to a crash of the server means one more delivery, which receivers dedupe on webhook-id.

What replicas share is made safe by the database itself:
- a claim takes due rows with FOR UPDATE SKIP LOCKED, marks them in flight for this replica
  (`claimed_by`) until a visibility deadline, which the replica pushes forward while it still
  holds them; rows whose deadline passed (their replica died) are claimable again;
- new rows are inserted with ON CONFLICT DO NOTHING on (webhook, message_id): a commit whose
  outcome was lost with the connection is simply written again by its caller;
- a write under a `Fence` checks, in its own transaction, that the lease still holds (FOR SHARE:
  a take-over waits for the write's commit), and writes nothing if it does not;
- committed rows NOTIFY `relayd_deliveries` with their webhook; every replica LISTENs and wakes
  that webhook's dispatcher, and wakes every webhook it knows of every few seconds all the same.

The server unreachable: every commit fails at once with an OutboxError naming the server (never
the password), the store reconnects with backoff, `healthy` is False meanwhile, and callers keep
what they could not write (a watcher's socket waits), as with a failing disk under SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
import structlog

from relayd.store.base import (
    EVERYTHING,
    REPLAYABLE,
    RESENDABLE,
    AttemptResult,
    Backlog,
    Delivery,
    Fence,
    Fenced,
    Filter,
    InsertPlan,
    NewDelivery,
    OutboxError,
    Router,
    State,
    StoreKind,
    Summary,
    failed_attempt_rows,
    result_rows,
    with_attempt_log,
)
from relayd.store.batching import CommitQueue

log = structlog.get_logger("relayd.outbox")

T = TypeVar("T")
Connection = asyncpg.Connection
Operation = Callable[[Connection], Awaitable[Any]]

CHANNEL = "relayd_deliveries"  # NOTIFY payload: the webhook whose rows were committed
# How long rows claimed by a replica stay its own without it saying it still holds them. A live
# replica pushes the deadline forward every VISIBILITY_RENEW; a dead one's rows are claimable by
# others once it passes.
VISIBILITY = 30.0
VISIBILITY_RENEW = 10.0
WAKE_EVERY = 5.0  # the safety net under LISTEN/NOTIFY: every known webhook is woken this often
CONNECT_TIMEOUT = 10.0
CLOSING_CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 60.0  # a statement that takes longer is a server in trouble: fail the commit
RECONNECT_FIRST = 0.1  # the backoff between connection attempts doubles from here
RECONNECT_MAX = 5.0
# The advisory lock migrations run under (any constant; "relayd" in ASCII).
MIGRATION_LOCK = 0x72656C617964

# Versioned migrations, each run once, in order, in one transaction under MIGRATION_LOCK.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE deliveries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    text             NOT NULL,  -- webhook-id: the same on every attempt
    webhook       text             NOT NULL,
    drive         text             NOT NULL,
    body          bytea            NOT NULL,  -- fixed at receipt, sent byte for byte
    created       double precision NOT NULL,  -- Unix seconds, as in the SQLite store
    retry_from    double precision NOT NULL,
    state         text             NOT NULL,
    attempts      integer          NOT NULL DEFAULT 0,
    next_attempt  double precision NOT NULL,
    last_attempt  double precision,
    last_status   integer,
    last_error    text,
    last_latency  double precision,
    last_response text,
    finished      double precision,
    claimed_by    text,                       -- the replica a row in flight belongs to
    visible_until timestamptz                 -- ... until then (the database's clock)
);
-- A notification is one row per webhook: writing it again (a commit whose outcome was lost with
-- the connection) changes nothing.
CREATE UNIQUE INDEX deliveries_message ON deliveries (webhook, message_id);
CREATE INDEX deliveries_queue ON deliveries (webhook, state, next_attempt, id);
CREATE INDEX deliveries_done ON deliveries (state, finished) WHERE finished IS NOT NULL;
CREATE INDEX deliveries_claimed ON deliveries (claimed_by) WHERE state = 'inflight';
CREATE TABLE attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   bigint           NOT NULL,
    at            double precision NOT NULL,
    status        integer,
    error         text,
    latency       double precision,
    response      text
);
CREATE INDEX attempts_of ON attempts (delivery_id, at);
CREATE TABLE drives (
    name          text             PRIMARY KEY,
    resource      text             NOT NULL,
    cursor        text,
    updated       double precision NOT NULL,
    drive_id      text
);
-- The cluster's tables (relayd.cluster): live replicas, and leases with their fencing epochs.
-- Every time in them is the database's clock_timestamp(), never a replica's.
CREATE TABLE replicas (
    name      text PRIMARY KEY,
    started   timestamptz NOT NULL,
    heartbeat timestamptz NOT NULL,
    expires   timestamptz NOT NULL,
    info      jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE leases (
    resource  text PRIMARY KEY,
    holder    text,
    epoch     bigint NOT NULL,
    acquired  timestamptz NOT NULL,
    expires   timestamptz NOT NULL
);
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_COLUMNS = (
    "id, message_id, webhook, drive, body, created, retry_from, state, attempts, next_attempt,"
    " last_attempt, last_status, last_error, last_latency, last_response, finished"
)
_ROW_COLUMNS = "id, message_id, webhook, drive, body, created, retry_from, attempts"
_INSERT = (
    "INSERT INTO deliveries (message_id, webhook, drive, body, created, retry_from, state,"
    " next_attempt, claimed_by, visible_until)"
    " SELECT m, w, d, b, c, c, $6, c, $7, CASE WHEN $7::text IS NULL THEN NULL"
    " ELSE clock_timestamp() + make_interval(secs => $8) END"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::float8[])"
    " AS u(m, w, d, b, c)"
    " ON CONFLICT (webhook, message_id) DO NOTHING"
)
_FENCE = (
    "SELECT 1 FROM leases WHERE resource = $1 AND holder = $2 AND epoch = $3"
    " AND expires > clock_timestamp() FOR SHARE"
)


def default_replica() -> str:
    """This process's name among replicas when none is configured: hostname-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def safe_url(url: str) -> str:
    """The URL without its password (and without a query, which may hold one): log-safe."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    if parts.username:
        netloc = f"{urllib.parse.unquote(parts.username)}@{netloc}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def probe(url: str) -> str:
    """What `relayd doctor` says of the database: reachable, and at which schema. Changes
    nothing (no migration). Raises OutboxError, log-safe, when it cannot be used."""
    location = safe_url(url)
    password = urllib.parse.urlsplit(url).password
    try:
        connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        try:
            exists = await connection.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            version = (
                await connection.fetchval("SELECT max(version) FROM schema_version")
                if exists
                else None
            )
        finally:
            await connection.close()
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        raise OutboxError(
            f"{location}: cannot connect: {text.replace(password, '***') if password else text}"
        ) from None
    if version is None:
        return f"{location} reachable; empty: relayd creates its tables at start"
    if version > SCHEMA_VERSION:
        raise OutboxError(f"{location}: written by a newer relayd (schema {version})")
    return f"{location} reachable, schema {version}"


def numbered(sql: str, start: int = 1) -> str:
    """SQLite's `?` placeholders as PostgreSQL's `$1, $2, ...`; pure (no `?` occurs otherwise)."""
    pieces = sql.split("?")
    out = [pieces[0]]
    for index, piece in enumerate(pieces[1:]):
        out.append(f"${start + index}{piece}")
    return "".join(out)


def _where(selection: Filter) -> tuple[str, list[Any]]:
    where, params = selection.where()
    return ("TRUE" if where == "1" else numbered(where)), params


def _connection_lost(exc: BaseException, connection: Connection | None) -> bool:
    """The failure was the connection's or the server's, not the operation's own."""
    if connection is None or connection.is_closed():
        return True
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InsufficientResourcesError,
    )


@dataclass(frozen=True)
class _Queued:
    operation: Operation
    future: asyncio.Future[Any]
    durable: bool
    after: Callable[[bool, Any], None] | None = None


class PostgresStore:
    """`async with PostgresStore(url) as store:` connects, migrates, and owns its tasks."""

    kind: StoreKind = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        recover: bool = True,
        router: Router | None = None,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`recover` puts rows this replica left in flight (a previous run under the same name)
        back in the queue; other replicas' rows are theirs until their deadline passes."""
        self._url = url
        self._password = urllib.parse.urlsplit(url).password
        self.location = safe_url(url)
        self.replica = replica or default_replica()
        self._recover = recover
        self._router = router
        self._clock = clock
        self.disk_full = False  # the server's disk is its own business: commits fail instead
        self.failures = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.commits = 0
        self.reconnects = 0  # connections made again after one was lost
        self._connection: Connection | None = None
        self._retry_at = 0.0  # monotonic: no connection attempt before then
        self._backoff = RECONNECT_FIRST
        self._connect_error: OutboxError | None = None
        self._commits: CommitQueue[_Queued] = CommitQueue()
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._held: set[int] = set()  # rows in flight that a dispatcher of this process holds
        self._webhooks: set[str] = set()  # webhooks heard of: the safety net wakes them all
        self._own_pids: set[int] = set()  # our writer connections' backends: their NOTIFYs

    def describe(self) -> str:
        return self.location

    @property
    def healthy(self) -> bool:
        return self.failing_since is None

    # -- life cycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._connection = await self._connect()
        try:
            await self._migrate(self._connection)
            if self._recover:
                await self._connection.execute(
                    "UPDATE deliveries SET state = 'pending', claimed_by = NULL,"
                    " visible_until = NULL WHERE state = 'inflight' AND claimed_by = $1",
                    self.replica,
                )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._connection.close(timeout=2)
            self._connection = None
            if isinstance(exc, Exception) and not isinstance(exc, OutboxError):
                raise self._error(exc) from None
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="relayd-outbox-writer")
        self._tasks.append(self._writer)
        if self._router is not None:  # the daemon's store, not a CLI command's
            self._tasks.append(
                asyncio.create_task(self._listen_loop(), name="relayd-outbox-listen")
            )
            self._tasks.append(asyncio.create_task(self._keep_loop(), name="relayd-outbox-keeper"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit what is queued, then close. Safe to call twice."""
        self._commits.close()
        helpers = [task for task in self._tasks if task is not self._writer]
        for task in helpers:
            task.cancel()
        if helpers:
            await asyncio.gather(*helpers, return_exceptions=True)
        if self._writer is not None:
            try:
                await self._writer
            finally:
                self._writer = None
        self._tasks = []
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close(timeout=5)
            self._connection = None

    async def _connect(self, timeout: float = CONNECT_TIMEOUT) -> Connection:
        try:
            connection: Connection = await asyncpg.connect(
                self._url,
                timeout=timeout,
                command_timeout=COMMAND_TIMEOUT,
                # On, whatever the server's default: a notification is committed when we say so.
                server_settings={"synchronous_commit": "on", "application_name": "relayd"},
            )
        except Exception as exc:
            raise self._error(exc, doing="cannot connect") from None
        self._own_pids.add(connection.get_server_pid())
        return connection

    async def _migrate(self, connection: Connection) -> None:
        """Bring the schema up to SCHEMA_VERSION, under an advisory lock: replicas starting at
        once (even of different versions) migrate one after the other, each seeing the last's
        work. A schema newer than this relayd knows is refused, never touched."""
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
            )
            version = await connection.fetchval("SELECT max(version) FROM schema_version") or 0
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"{self.location}: written by a newer relayd (schema {version});"
                    " refusing to touch it"
                )
            for number, sql in MIGRATIONS:
                if number > version:
                    await connection.execute(sql)
                    await connection.execute("INSERT INTO schema_version VALUES ($1)", number)
                    log.info("store schema migrated", store=self.location, version=number)

    # -- errors ----------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _error(self, exc: BaseException, *, doing: str | None = None) -> OutboxError:
        if isinstance(exc, OutboxError):
            return exc
        detail = self._scrub(str(exc) or type(exc).__name__)
        prefix = f"{self.location}: {doing}: " if doing else f"{self.location}: "
        return OutboxError(prefix + detail)

    def _failed(self, failure: OutboxError, *, whole_commit: bool) -> None:
        self.failures += 1
        self.last_error = str(failure)
        if whole_commit and self.failing_since is None:
            self.failing_since = time.time()
            log.error("the store cannot be written", error=self.last_error)

    def _recovered(self) -> None:
        if self.failing_since is not None:
            log.info(
                "the store is written again",
                after_seconds=round(time.time() - self.failing_since, 1),
            )
            self.failing_since = None

    # -- group commit ----------------------------------------------------------------------------

    async def _submit(
        self,
        operation: Callable[[Connection], Awaitable[T]],
        *,
        durable: bool = False,
        deferrable: bool = False,
        after: Callable[[bool, Any], None] | None = None,
    ) -> T:
        """Run `operation` in the next group commit (see the SQLite store's `_submit`)."""
        if self._commits.closing or self._writer is None:
            error = OutboxError(f"{self.location}: the store is closed")
            if after is not None:
                after(False, error)
            raise error
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._commits.put(_Queued(operation, future, durable, after), deferrable=deferrable)
        return await future

    async def _write_loop(self) -> None:
        while (batch := await self._commits.next_batch()) is not None:
            try:
                # Shielded: a cancelled writer still learns how the transaction ended.
                await asyncio.shield(self._commit(batch))
            except Exception as exc:
                # The writer is the store's only way in: it must outlive anything it meets.
                log.exception("the store's writer met an unexpected error; it goes on")
                for queued in batch:
                    if not queued.future.done():
                        queued.future.set_exception(self._error(exc))

    async def _connected(self) -> Connection:
        """The writer's connection, made again (with backoff) if it was lost."""
        connection = self._connection
        if connection is not None and not connection.is_closed():
            return connection
        self._connection = None
        if time.monotonic() < self._retry_at and self._connect_error is not None:
            raise self._connect_error  # fail fast between attempts: callers keep their rows
        try:
            # Closing: the stop must not wait long for a server that is away. What cannot be
            # committed fails, and its callers say so (a watcher counts what it could not store).
            connection = await self._connect(
                CLOSING_CONNECT_TIMEOUT if self._commits.closing else CONNECT_TIMEOUT
            )
        except OutboxError as exc:
            self._connect_error = exc
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            raise
        self._backoff, self._connect_error = RECONNECT_FIRST, None
        self.reconnects += 1
        log.info("connected to the store again", store=self.location)
        self._connection = connection
        return connection

    def _drop(self, connection: Connection | None) -> None:
        """Forget a connection that failed; the next commit makes a new one."""
        if connection is not None:
            connection.terminate()
        self._connection = None

    async def _commit(self, batch: list[_Queued]) -> None:
        operations = [queued.operation for queued in batch]
        durable = any(queued.durable for queued in batch)
        commit_error: OutboxError | None = None
        connection: Connection | None = None
        try:
            connection = await self._connected()
            outcomes = await self._run_batch(connection, operations, durable)
        except Exception as exc:
            # The connection or the server failed: nothing of this batch is known to be
            # written. Its callers hold their rows and try again (rows written twice are one).
            if not isinstance(exc, OutboxError):
                self._drop(connection)
            commit_error = self._error(exc, doing="commit failed")
            outcomes = [(False, commit_error)] * len(batch)
        outcomes = [
            (ok, value if ok or isinstance(value, OutboxError) else self._error(value))
            for ok, value in outcomes
        ]
        if commit_error is None:
            self._recovered()
        else:
            self._failed(commit_error, whole_commit=True)
        for queued, (ok, value) in zip(batch, outcomes, strict=True):
            if queued.after is not None:
                try:
                    queued.after(ok, value)
                except Exception:
                    log.exception("a store commit's follow-up failed")
        for future, (ok, value) in zip((q.future for q in batch), outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def _run_batch(
        self, connection: Connection, operations: Sequence[Operation], durable: bool
    ) -> list[tuple[bool, Any]]:
        """One transaction for the batch; if an operation fails, again with a savepoint around
        each, so that only the failing one is undone and told so."""
        try:
            async with connection.transaction():
                if not durable:
                    await connection.execute("SET LOCAL synchronous_commit = off")
                outcomes: list[tuple[bool, Any]] = [
                    (True, await operation(connection)) for operation in operations
                ]
            self.commits += 1
            return outcomes
        except Exception as exc:
            if _connection_lost(exc, connection):
                raise
            if len(operations) == 1:
                return [(False, exc)]
        outcomes = []
        async with connection.transaction():
            if not durable:
                await connection.execute("SET LOCAL synchronous_commit = off")
            for operation in operations:
                try:
                    async with connection.transaction():  # a savepoint
                        outcomes.append((True, await operation(connection)))
                except Exception as exc:
                    if _connection_lost(exc, connection):
                        raise
                    outcomes.append((False, exc))
        self.commits += 1
        return outcomes

    # -- LISTEN/NOTIFY and the replica's own rows ------------------------------------------------

    def _heard(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        webhook = str(payload)
        self._webhooks.add(webhook)
        if pid not in self._own_pids and self._router is not None:
            self._router.wake(webhook)

    async def _listen_loop(self) -> None:
        """LISTEN on a connection of its own, made again whenever it is lost; and every
        WAKE_EVERY seconds, wake every webhook heard of (the safety net: a notification sent
        while the listener was away is never heard)."""
        listener: Connection | None = None
        backoff = RECONNECT_FIRST
        while True:
            try:
                if listener is None or listener.is_closed():
                    listener = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT)
                    await listener.add_listener(CHANNEL, self._heard)
                    self._own_pids.add(listener.get_server_pid())
                    backoff = RECONNECT_FIRST
                    # What was committed while nobody listened: wake whoever has rows waiting.
                    waiting = await listener.fetch(
                        "SELECT DISTINCT webhook FROM deliveries WHERE state = 'pending'"
                    )
                    self._webhooks.update(row[0] for row in waiting)
                if self._router is not None:
                    for webhook in sorted(self._webhooks):
                        self._router.wake(webhook)
                await asyncio.sleep(WAKE_EVERY)
            except asyncio.CancelledError:
                if listener is not None:
                    listener.terminate()
                raise
            except Exception as exc:
                # The writer reports the store's health; here only the wake-ups are late.
                log.debug("the store's listener is reconnecting", error=self._scrub(str(exc)))
                if listener is not None:
                    listener.terminate()
                listener = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)

    async def _keep_loop(self) -> None:
        """Push the deadline of the rows this process's dispatchers hold forward, and put rows
        whose deadline passed (a dead replica's) back in the queue. Through the writer, so that
        an unreachable server shows in `healthy` even while no notification arrives."""
        while True:
            with contextlib.suppress(OutboxError):
                await self._submit(functools.partial(self._keep, sorted(self._held)))
            await asyncio.sleep(VISIBILITY_RENEW)

    async def _keep(self, held: list[int], connection: Connection) -> None:
        await connection.execute(
            "UPDATE deliveries SET visible_until = clock_timestamp() + make_interval(secs => $3)"
            " WHERE id = ANY($1::bigint[]) AND state = 'inflight' AND claimed_by = $2",
            held,
            self.replica,
            VISIBILITY,
        )
        await connection.execute(
            "UPDATE deliveries SET state = 'pending', claimed_by = NULL, visible_until = NULL"
            " WHERE state = 'inflight' AND visible_until < clock_timestamp()"
        )

    # -- the daemon's operations -----------------------------------------------------------------

    @staticmethod
    async def _check_fence(connection: Connection, fence: Fence | None) -> None:
        if fence is None:
            return
        if await connection.fetchval(_FENCE, fence.resource, fence.holder, fence.epoch) is None:
            raise Fenced(
                f"{fence.resource}: no longer held by {fence.holder} at epoch {fence.epoch};"
                " nothing written"
            )

    async def add(self, deliveries: Sequence[NewDelivery], *, fence: Fence | None = None) -> None:
        """Returns once the rows are committed."""
        if deliveries:
            await self._insert(deliveries, None, fence)

    async def _insert(
        self,
        deliveries: Sequence[NewDelivery],
        also: Callable[[Connection], Awaitable[None]] | None,
        fence: Fence | None,
    ) -> None:
        plan = InsertPlan.plan(deliveries, self._router)

        async def insert(connection: Connection) -> list[list[Delivery]]:
            await self._check_fence(connection, fence)
            if plan.waiting:
                await connection.execute(
                    _INSERT, *_arrays(plan.waiting), State.PENDING.value, None, None
                )
                await connection.execute(
                    "SELECT pg_notify($1, webhook) FROM unnest($2::text[]) AS webhook",
                    CHANNEL,
                    sorted({d.webhook for d in plan.waiting}),
                )
            handed: list[list[Delivery]] = []
            for _, rows in plan.claimed:
                ids: dict[str, int] = {}
                if rows:
                    inserted = await connection.fetch(
                        _INSERT + " RETURNING id, message_id",
                        *_arrays(rows),
                        State.INFLIGHT.value,
                        self.replica,
                        VISIBILITY,
                    )
                    ids = {row["message_id"]: row["id"] for row in inserted}
                # A row already there (written by a commit whose outcome was lost) is not
                # handed over: it is pending or in flight already, and claimed as such.
                handed.append(
                    [
                        Delivery(
                            ids[d.message_id],
                            d.message_id,
                            d.webhook,
                            d.drive,
                            d.body,
                            d.created,
                            d.created,
                            0,
                        )
                        for d in rows
                        if d.message_id in ids
                    ]
                )
            if also is not None:
                await also(connection)
            return handed

        def route(ok: bool, handed: Any) -> None:
            if ok:
                self._webhooks.update(d.webhook for d in deliveries)
                for rows in handed:
                    self._held.update(row.id for row in rows)
            refused = plan.announce(self._router, handed if ok else None)
            if refused:
                self._requeue(refused)

        await self._submit(insert, durable=True, after=route)

    def _requeue(self, refused: list[Delivery]) -> None:
        """Rows a stopped dispatcher refused go back to the queue (see the SQLite store)."""
        ids = [row.id for row in refused]
        self._held.difference_update(ids)

        def woken(ok: bool, error: Any) -> None:
            if not ok:
                # Their deadline passes and they return to the queue by themselves.
                log.error("cannot put refused rows back in the queue", error=str(error))
            elif self._router is not None:
                for webhook in {row.webhook for row in refused}:
                    self._router.wake(webhook)

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._commits.put(_Queued(_back_to_pending(ids), future, False, woken))

    async def claim(self, webhook: str, limit: int, *, ordered: bool = False) -> list[Delivery]:
        """Take up to `limit` due rows, in flight for this replica until its deadline.

        Rows of another replica whose deadline passed are returned to the queue first. Ordered
        webhooks get only the oldest waiting row, and only while no row is in flight anywhere.
        """
        now = self._clock()

        async def take(connection: Connection) -> list[Delivery]:
            await connection.execute(
                "UPDATE deliveries SET state = 'pending', claimed_by = NULL, visible_until = NULL"
                " WHERE webhook = $1 AND state = 'inflight' AND visible_until < clock_timestamp()",
                webhook,
            )
            if ordered:
                # One claim at a time per ordered webhook, whichever replica makes it: the
                # webhook's lease says who should, this makes sure of it.
                await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", webhook)
                if await connection.fetchval(
                    "SELECT 1 FROM deliveries WHERE webhook = $1 AND state = 'inflight' LIMIT 1",
                    webhook,
                ):
                    return []
                due = (
                    "SELECT id FROM deliveries WHERE webhook = $1 AND state = 'pending'"
                    " AND next_attempt <= $2 AND id = (SELECT MIN(id) FROM deliveries"
                    " WHERE webhook = $1 AND state = 'pending')"
                )
                extra: list[int] = []
            else:
                due = (
                    "SELECT id FROM deliveries WHERE webhook = $1 AND state = 'pending'"
                    " AND next_attempt <= $2 ORDER BY next_attempt, id LIMIT $5"
                    " FOR UPDATE SKIP LOCKED"
                )
                extra = [limit]
            rows = await connection.fetch(
                "UPDATE deliveries SET state = 'inflight', claimed_by = $3,"
                " visible_until = clock_timestamp() + make_interval(secs => $4),"
                " retry_from = LEAST(retry_from, $2)"
                f" WHERE id IN ({due}) RETURNING {_ROW_COLUMNS}",
                webhook,
                now,
                self.replica,
                VISIBILITY,
                *extra,
            )
            rows = sorted(rows, key=lambda row: row["id"])
            return [
                Delivery(
                    row["id"],
                    row["message_id"],
                    row["webhook"],
                    row["drive"],
                    row["body"],
                    row["created"],
                    min(row["retry_from"], now),
                    row["attempts"],
                )
                for row in rows
            ]

        claimed = await self._submit(take)
        self._held.update(row.id for row in claimed)
        return claimed

    async def next_due(
        self, webhook: str, *, ordered: bool = False, horizon: float | None = None
    ) -> float | None:
        """When `claim` will next have a row for the webhook (see the SQLite store)."""
        now = self._clock()

        async def query(connection: Connection) -> float | None:
            if horizon is not None:
                await connection.execute(
                    "UPDATE deliveries SET next_attempt = $2, retry_from = LEAST(retry_from, $2)"
                    " WHERE webhook = $1 AND state = 'pending' AND next_attempt > $3",
                    webhook,
                    now,
                    now + horizon,
                )
            if ordered:
                if await connection.fetchval(
                    "SELECT 1 FROM deliveries WHERE webhook = $1 AND state = 'inflight' LIMIT 1",
                    webhook,
                ):
                    return None
                value = await connection.fetchval(
                    "SELECT next_attempt FROM deliveries WHERE webhook = $1 AND state = 'pending'"
                    " ORDER BY id LIMIT 1",
                    webhook,
                )
            else:
                value = await connection.fetchval(
                    "SELECT MIN(next_attempt) FROM deliveries WHERE webhook = $1"
                    " AND state = 'pending'",
                    webhook,
                )
            return None if value is None else float(value)

        return await self._submit(query)

    async def record(self, results: Iterable[AttemptResult]) -> None:
        """Store what attempts came to: delivered, dead, or pending again with a next attempt."""
        results = list(results)
        rows, failed = result_rows(results), failed_attempt_rows(results)

        async def update(connection: Connection) -> None:
            await connection.executemany(
                "UPDATE deliveries SET state = $1, next_attempt = $2, attempts = attempts + 1,"
                " last_attempt = $3, last_status = $4, last_error = $5, last_latency = $6,"
                " last_response = $7, finished = $8, claimed_by = NULL, visible_until = NULL"
                " WHERE id = $9",
                rows,
            )
            if failed:
                await connection.executemany(
                    "INSERT INTO attempts (delivery_id, at, status, error, latency, response)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    failed,
                )

        await self._submit(update, deferrable=True)
        # Only once recorded: until then the rows are still ours, and their deadline renewed.
        self._held.difference_update(r.id for r in results)

    async def release(self, ids: Iterable[int]) -> None:
        """Put claimed rows back untouched (a shutdown interrupted their attempt)."""
        ids = list(ids)
        await self._submit(_back_to_pending(ids))
        self._held.difference_update(ids)

    async def prune(self, delivered_before: float) -> int:
        """Forget delivered rows that finished before the given time."""

        async def delete(connection: Connection) -> int:
            where = "state = 'delivered' AND finished < $1"
            await connection.execute(
                f"DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries"
                f" WHERE {where})",
                delivered_before,
            )
            status = await connection.execute(
                f"DELETE FROM deliveries WHERE {where}", delivered_before
            )
            return _count(status)

        return await self._submit(delete)

    async def backlog(self) -> Backlog:
        async def query(connection: Connection) -> Backlog:
            counts: dict[str, int] = {}
            oldest: dict[str, float] = {}
            per_drive: dict[str, int] = {}
            for webhook, drive, count, created in await connection.fetch(
                "SELECT webhook, drive, COUNT(*), MIN(created) FROM deliveries"
                " WHERE state IN ('pending', 'inflight') GROUP BY webhook, drive"
            ):
                counts[webhook] = counts.get(webhook, 0) + count
                oldest[webhook] = min(oldest.get(webhook, created), created)
                per_drive[drive] = per_drive.get(drive, 0) + count
            dead = {
                webhook: count
                for webhook, count in await connection.fetch(
                    "SELECT webhook, COUNT(*) FROM deliveries"
                    " WHERE state = 'dead' AND finished IS NOT NULL GROUP BY webhook"
                )
            }
            return Backlog(counts=counts, oldest=oldest, per_drive=per_drive, dead=dead)

        return await self._submit(query)

    async def drive_state(self, name: str) -> tuple[str, str | None] | None:
        async def query(connection: Connection) -> tuple[str, str | None] | None:
            row = await connection.fetchrow(
                "SELECT resource, cursor FROM drives WHERE name = $1", name
            )
            return None if row is None else (row[0], row[1])

        return await self._submit(query)

    async def save_drive_state(
        self,
        name: str,
        resource: str,
        cursor: str | None,
        deliveries: Sequence[NewDelivery] = (),
        *,
        fence: Fence | None = None,
    ) -> None:
        """A drive's cursor and the deliveries its page produced, in one transaction."""
        now = self._clock()

        async def upsert(connection: Connection) -> None:
            await connection.execute(
                "INSERT INTO drives (name, resource, cursor, updated) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (name) DO UPDATE SET resource = excluded.resource,"
                " cursor = excluded.cursor, updated = excluded.updated,"
                " drive_id = CASE WHEN drives.resource = excluded.resource"
                " THEN drives.drive_id END",
                name,
                resource,
                cursor,
                now,
            )

        await self._insert(deliveries, upsert, fence)

    async def drive_id(self, name: str) -> tuple[str, str] | None:
        async def query(connection: Connection) -> tuple[str, str] | None:
            row = await connection.fetchrow(
                "SELECT resource, drive_id FROM drives WHERE name = $1 AND drive_id IS NOT NULL",
                name,
            )
            return None if row is None else (row[0], row[1])

        return await self._submit(query)

    async def save_drive_id(self, name: str, resource: str, drive_id: str) -> None:
        now = self._clock()

        async def upsert(connection: Connection) -> None:
            await connection.execute(
                "INSERT INTO drives (name, resource, cursor, updated, drive_id)"
                " VALUES ($1, $2, NULL, $3, $4)"
                " ON CONFLICT (name) DO UPDATE SET drive_id = excluded.drive_id,"
                " updated = excluded.updated,"
                " cursor = CASE WHEN drives.resource = excluded.resource THEN drives.cursor END,"
                " resource = excluded.resource",
                name,
                resource,
                now,
                drive_id,
            )

        await self._submit(upsert, durable=True)

    # -- inspection and repair (the `relayd outbox` commands) -----------------------------------

    async def summary(self, selection: Filter = EVERYTHING) -> Summary:
        where, params = _where(selection)

        async def query(connection: Connection) -> Summary:
            counts = {
                (webhook, State(state)): count
                for webhook, state, count in await connection.fetch(
                    f"SELECT webhook, state, COUNT(*) FROM deliveries WHERE {where}"
                    " GROUP BY webhook, state",
                    *params,
                )
            }
            oldest = {
                webhook: created
                for webhook, created in await connection.fetch(
                    f"SELECT webhook, MIN(created) FROM deliveries WHERE {where} AND state IN"
                    " ('pending', 'inflight') GROUP BY webhook",
                    *params,
                )
            }
            return Summary(counts=counts, oldest_pending=oldest)

        return await self._submit(query)

    async def row(self, row_id: int) -> dict[str, Any] | None:
        """One row with its body and every attempt (oldest first), for `relayd outbox show`."""

        async def query(connection: Connection) -> dict[str, Any] | None:
            found = await connection.fetchrow(
                f"SELECT {_COLUMNS} FROM deliveries WHERE id = $1", row_id
            )
            if found is None:
                return None
            row = dict(found.items())
            attempts = [
                dict(attempt.items())
                for attempt in await connection.fetch(
                    "SELECT at, status, error, latency, response FROM attempts"
                    " WHERE delivery_id = $1 ORDER BY at, id",
                    row_id,
                )
            ]
            return with_attempt_log(row, attempts)

        return await self._submit(query)

    async def names(self) -> tuple[set[str], set[str]]:
        async def query(connection: Connection) -> tuple[set[str], set[str]]:
            webhooks = {
                row[0] for row in await connection.fetch("SELECT DISTINCT webhook FROM deliveries")
            }
            drives = {
                row[0] for row in await connection.fetch("SELECT DISTINCT drive FROM deliveries")
            }
            return webhooks, drives

        return await self._submit(query)

    async def rows(
        self, selection: Filter = EVERYTHING, *, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Rows without their bodies, newest first, for `relayd outbox list`."""
        where, params = _where(selection)

        async def query(connection: Connection) -> list[dict[str, Any]]:
            found = await connection.fetch(
                "SELECT id, message_id, webhook, drive, state, created, attempts, next_attempt,"
                " last_attempt, last_status, last_error, last_latency, last_response"
                f" FROM deliveries WHERE {where} ORDER BY id DESC LIMIT ${len(params) + 1}",
                *params,
                limit,
            )
            return [dict(row.items()) for row in found]

        return await self._submit(query)

    async def replay(self, selection: Filter, *, dry_run: bool = False) -> int:
        """Dead rows (or waiting ones, asked for) due now, with a fresh max_age and backoff."""
        state = selection.state or State.DEAD
        if state not in REPLAYABLE:
            what = "rows in flight" if state is State.INFLIGHT else f"{state.value} ones"
            raise ValueError(f"replay reaches dead or pending rows, not {what}")
        where, params = _where(replace(selection, state=state))
        return await self._make_due(where, params, dry_run=dry_run)

    async def resend(self, selection: Filter, *, dry_run: bool = False) -> int:
        """Finished rows sent again, with the same webhook-id (see the SQLite store)."""
        if selection.state is not None and selection.state not in RESENDABLE:
            raise ValueError(f"resend reaches delivered or dead rows, not {selection.state.value}")
        where, params = _where(selection)
        if selection.state is None:
            where += " AND state IN ('delivered', 'dead') AND finished IS NOT NULL"
        return await self._make_due(where, params, dry_run=dry_run)

    async def _make_due(self, where: str, params: list[Any], *, dry_run: bool) -> int:
        if dry_run:
            return await self._count(where, params)
        now = self._clock()

        async def update(connection: Connection) -> int:
            found = await connection.fetch(
                "UPDATE deliveries SET state = $1, next_attempt = $2, retry_from = $3,"
                " finished = NULL, attempts = 0, claimed_by = NULL, visible_until = NULL"
                f" WHERE {_shift(where, 3)} RETURNING webhook",
                State.PENDING.value,
                now,
                now,
                *params,
            )
            webhooks = sorted({row[0] for row in found})
            if webhooks:  # every replica's dispatcher for them looks at once
                await connection.execute(
                    "SELECT pg_notify($1, webhook) FROM unnest($2::text[]) AS webhook",
                    CHANNEL,
                    webhooks,
                )
            return len(found)

        return await self._submit(update, durable=True)

    async def _count(self, where: str, params: list[Any]) -> int:
        async def query(connection: Connection) -> int:
            return int(
                await connection.fetchval(f"SELECT COUNT(*) FROM deliveries WHERE {where}", *params)
            )

        return await self._submit(query)

    async def purge(self, selection: Filter, *, dry_run: bool = False) -> int:
        """Delete the selected finished rows (waiting ones only when asked; never in flight)."""
        if selection.state is State.INFLIGHT:
            raise ValueError("purge never deletes rows in flight: a dispatcher holds them")
        where, params = _where(selection)
        if selection.state is None:
            where += " AND state IN ('dead', 'delivered') AND finished IS NOT NULL"
        if dry_run:
            return await self._count(where, params)

        async def delete(connection: Connection) -> int:
            await connection.execute(
                f"DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries"
                f" WHERE {where})",
                *params,
            )
            return _count(
                await connection.execute(f"DELETE FROM deliveries WHERE {where}", *params)
            )

        return await self._submit(delete, durable=selection.state is State.PENDING)


def _arrays(rows: Sequence[NewDelivery]) -> tuple[list[Any], ...]:
    """New rows as the column arrays _INSERT unnests: one statement for any number of rows."""
    return (
        [d.message_id for d in rows],
        [d.webhook for d in rows],
        [d.drive for d in rows],
        [d.body for d in rows],
        [float(d.created) for d in rows],
    )


def _back_to_pending(ids: list[int]) -> Operation:
    async def update(connection: Connection) -> None:
        await connection.execute(
            "UPDATE deliveries SET state = 'pending', claimed_by = NULL, visible_until = NULL"
            " WHERE id = ANY($1::bigint[]) AND state = 'inflight'",
            ids,
        )

    return update


def _shift(where: str, by: int) -> str:
    """A numbered WHERE clause with its placeholders moved up by `by` ($1 -> $4): for a
    statement whose own parameters come first; pure."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + by}", where)


def _count(status: str) -> int:
    """The row count of a command status such as 'DELETE 3'."""
    return int(status.rsplit(" ", 1)[-1])
