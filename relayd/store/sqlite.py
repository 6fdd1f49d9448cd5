"""The SQLite store (the default): every notification is committed before anything else happens.

A Socket.IO notification cannot be asked for again, so each one is written to SQLite (WAL mode,
synced to disk after each commit) as the exact body bytes that will be POSTed, one row per
(notification, webhook). Dispatchers deliver from here, and what exhausts its retries stays here
as a dead letter for replay.

One writer task owns the connection. Operations queue up while a commit is under way and the
next commit takes all of them in one transaction (group commit), so a commit's cost is shared by
every notification, claim and result that arrived in the meantime. An operation that fails is
undone alone: the batch is then run again with a savepoint around each operation. A syncer task
syncs the WAL to disk beside the writer, once for every commit made since its last sync began
(see _sync_loop).

Where a transaction runs is chosen by what it may wait for. Small ones (new notifications,
claims, attempt results) take a few tens of microseconds of SQLite and run on the event loop
itself: handing each to a thread and back would cost several times the work. What may wait runs
in the outbox's thread: the WAL's sync, a transaction that may touch much of the table (status,
prune, replay, a large delta page), one that must wait for a lock held by a CLI command, and WAL
checkpoints, which never happen as a side effect of a commit on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

import structlog

from relayd.store.base import (
    EVERYTHING,
    REPLAYABLE,
    RESENDABLE,
    AttemptResult,
    Backlog,
    Delivery,
    Fence,
    Filter,
    InsertPlan,
    NewDelivery,
    OutboxError,
    OutboxFull,
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
Operation = Callable[[sqlite3.Connection], Any]

# Rows changed (inserted, updated, deleted) between two WAL checkpoints: a few MiB of WAL at
# relayd's row sizes, about what SQLite's own default of 1,000 pages allows.
CHECKPOINT_AFTER_CHANGES = 2000
LOCK_WAIT_MS = 10_000  # how long a transaction in the thread waits for a CLI command's write
# New rows inserted at once beyond which the commit runs in the thread (a delta page can be
# hundreds of items): the loop never stalls for more than a few milliseconds.
INLINE_ROWS = 64
# A WAL this large is checkpointed whatever the row count (bodies vary in size), and the file
# is cut back to it when SQLite starts the WAL over: the WAL never eats the disk.
WAL_CHECKPOINT_BYTES = 4 << 20
# While the disk is full the WAL lives in what the reserve gave back: keep it far smaller.
WAL_CHECKPOINT_BYTES_FULL = 256 << 10
RESERVE_SUFFIX = ".reserve"
ROOM_CHECK_INTERVAL = 1.0  # while full, how often a new notification may look for room again

# 2: the attempts table, every failed attempt of a row, for `relayd outbox show`.
# 3: drives.drive_id (the id a `me`, `groups/...` or `sites/...` resource was resolved to).
SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id            INTEGER PRIMARY KEY,
    message_id    TEXT    NOT NULL,   -- webhook-id: the same on every attempt
    webhook       TEXT    NOT NULL,
    drive         TEXT    NOT NULL,
    body          BLOB    NOT NULL,   -- fixed at receipt, sent byte for byte on every attempt
    created       REAL    NOT NULL,
    retry_from    REAL    NOT NULL,   -- max_age counts from here (reset by a replay)
    state         TEXT    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL    NOT NULL,
    last_attempt  REAL,
    last_status   INTEGER,
    last_error    TEXT,
    last_latency  REAL,
    last_response TEXT,
    finished      REAL
);
CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries (webhook, state, next_attempt, id);
-- Finished rows only (delivered, dead: `finished` is set exactly then), for prune and for listing
-- dead letters. Queued rows stay out of it, so inserting, claiming and most state changes of a
-- row in flight cost no write to this index. Replaces deliveries_finished, which held every row.
DROP INDEX IF EXISTS deliveries_finished;
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries (state, finished)
    WHERE finished IS NOT NULL;
-- Every failed attempt, for `relayd outbox show`. A row's last attempt is also on the row, and a
-- successful one only there: the usual delivery (delivered at the first try) writes nothing here.
CREATE TABLE IF NOT EXISTS attempts (
    delivery_id   INTEGER NOT NULL,
    at            REAL    NOT NULL,
    status        INTEGER,
    error         TEXT,
    latency       REAL,
    response      TEXT
);
CREATE INDEX IF NOT EXISTS attempts_of ON attempts (delivery_id, at);
CREATE TABLE IF NOT EXISTS drives (
    name          TEXT    PRIMARY KEY,
    resource      TEXT    NOT NULL,
    cursor        TEXT,               -- the delta link to continue from (changes mode)
    updated       REAL    NOT NULL,
    drive_id      TEXT                -- what `resource` was resolved to (schema 3)
);
"""
# Columns later schemas added to tables that older files already have: (table, column, type).
# CREATE TABLE IF NOT EXISTS leaves an existing table as it was, so they are added here.
MIGRATIONS = (("drives", "drive_id", "TEXT"),)


def _migrate(connection: sqlite3.Connection) -> None:
    """Bring a file written by an older relayd up to SCHEMA_VERSION, in the open transaction."""
    for table, column, kind in MIGRATIONS:
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _disk_full(exc: BaseException) -> bool:
    """SQLite ran out of space (SQLITE_FULL), or a write or fsync said ENOSPC."""
    if isinstance(exc, OutboxError):
        return exc.disk_full
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


_INSERT = (
    "INSERT INTO deliveries (message_id, webhook, drive, body, created, retry_from, state,"
    " next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_ROW_COLUMNS = "id, message_id, webhook, drive, body, created, retry_from, attempts"


def _busy(exc: BaseException) -> bool:
    """SQLite could not take a lock another connection holds (SQLITE_BUSY and its variants)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and code & 0xFF == sqlite3.SQLITE_BUSY
    )


def _free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding `folder`."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _private(path: Path) -> None:
    """Create the file 0600 if it is missing, and make it 0600 if it is not: it holds tenant
    ids, notification bodies and receivers' answers. SQLite gives its -wal and -shm files the
    same mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            with contextlib.suppress(OSError):  # not ours (a CLI run by root): leave it be
                os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _values(d: NewDelivery, state: State) -> tuple[Any, ...]:
    return (d.message_id, d.webhook, d.drive, d.body, d.created, d.created, state, d.created)


class _Queued(NamedTuple):
    """An operation waiting for the next group commit, and what its commit must do for it."""

    operation: Operation
    future: asyncio.Future[Any]
    durable: bool  # the commit is synced to disk (by the syncer, if it ran on the loop)
    heavy: bool  # may take long: the commit runs in the thread, not on the loop
    # Told (ok, result or error) by the writer as soon as the commit's outcome is known, even if
    # the caller stopped waiting: what must follow a commit cannot depend on who still listens.
    after: Callable[[bool, Any], None] | None = None


def _run_insert(plan: InsertPlan, connection: sqlite3.Connection) -> list[list[Delivery]]:
    """Insert the rows; return the claimed ones as deliveries (they need their ids), one
    list per reservation."""
    if plan.waiting:
        connection.executemany(_INSERT, [_values(d, State.PENDING) for d in plan.waiting])
    handed: list[list[Delivery]] = []
    for _, rows in plan.claimed:
        deliveries: list[Delivery] = []
        for d in rows:
            (row_id,) = connection.execute(
                _INSERT + " RETURNING id", _values(d, State.INFLIGHT)
            ).fetchone()
            deliveries.append(
                Delivery(row_id, d.message_id, d.webhook, d.drive, d.body, d.created, d.created, 0)
            )
        handed.append(deliveries)
    return handed


def _back_to_pending(ids: Iterable[int]) -> Operation:
    """The operation that puts rows in flight back in the queue, untouched otherwise."""
    params = [(State.PENDING.value, row_id, State.INFLIGHT.value) for row_id in ids]

    def update(connection: sqlite3.Connection) -> None:
        connection.executemany("UPDATE deliveries SET state = ? WHERE id = ? AND state = ?", params)

    return update


def _due_now_if_beyond(
    connection: sqlite3.Connection, webhook: str, now: float, horizon: float
) -> None:
    """Make the webhook's waiting rows due later than now + horizon due now."""
    # MAX over (webhook, state, next_attempt) of deliveries_queue: a single index seek.
    (latest,) = connection.execute(
        "SELECT MAX(next_attempt) FROM deliveries WHERE webhook = ? AND state = ?",
        (webhook, State.PENDING.value),
    ).fetchone()
    if latest is None or latest <= now + horizon:
        return
    connection.execute(
        "UPDATE deliveries SET next_attempt = ?, retry_from = MIN(retry_from, ?)"
        " WHERE webhook = ? AND state = ? AND next_attempt > ?",
        (now, now, webhook, State.PENDING.value, now + horizon),
    )


class SqliteStore:
    """`async with SqliteStore(path) as store:` opens the store and owns its writer task.

    One process per state_dir (the supervisor's lock): fences are accepted and ignored.
    """

    kind: StoreKind = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        recover: bool = True,
        router: Router | None = None,
        clock: Callable[[], float] = time.time,
        disk_reserve: int = 0,
    ) -> None:
        """`recover` puts rows left in flight by a previous run back in the queue: only the
        daemon does that, never a CLI command opening the store beside it. Nor does a CLI
        command keep a `disk_reserve` (see `_give_up_reserve`)."""
        self.path = path
        self._recover = recover
        self._reserve_size = disk_reserve
        self._reserve_path = path.with_name(path.name + RESERVE_SUFFIX)
        # The WAL is checkpointed at this size: at most half the reserve, so that giving the
        # reserve up always leaves room to copy a full WAL into the database file.
        self._wal_limit = (
            min(WAL_CHECKPOINT_BYTES, disk_reserve // 2) if disk_reserve else WAL_CHECKPOINT_BYTES
        )
        self._room_checked = 0.0  # monotonic time of the last look for room while full
        self.disk_full = False  # new notifications are refused until there is room again
        self.failures = 0  # commits (and fsyncs) that failed: the relayd_outbox_errors metric
        self.last_error: str | None = None  # the latest failure, log-safe (names the file)
        self.failing_since: float | None = None  # since when every commit fails, if they do
        self._router = router
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relayd-outbox")
        self._connection: sqlite3.Connection | None = None
        self._commits: CommitQueue[_Queued] = CommitQueue()
        self._writer: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._sync_wake = asyncio.Event()
        self._unsynced = False  # a durable commit was made on the loop since the last sync began
        self._sync_closing = False  # the writer has ended: one last sync, then the syncer ends
        self._sync_failed = False  # the last sync failed: unhealthy until one works
        self._checkpointed_at = 0  # the connection's total_changes at the last checkpoint
        # Where frames written since the last checkpoint start in the WAL file: its size then,
        # or 0 once SQLite has started the WAL over (see _checkpoint_due).
        self._wal_base = 0
        self._wal_fd = -1  # the WAL file, for the syncer (durable commits made on the loop)
        self._synchronous_full = True  # the connection's current PRAGMA synchronous
        self.commits = 0  # transactions committed by the writer: one per group of operations
        self.checkpoints = 0  # WAL checkpoints the writer ran

    def describe(self) -> str:
        return str(self.path)

    @property
    def healthy(self) -> bool:
        """The store takes new notifications: the disk has room, and the last commit and the
        last sync worked."""
        return not self.disk_full and self.failing_since is None

    # -- life cycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._call(self._open)
        except BaseException:
            self._executor.shutdown(wait=True)  # no __aexit__ follows: do not leak its thread
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="relayd-outbox-writer")
        self._syncer = asyncio.create_task(self._sync_loop(), name="relayd-outbox-syncer")
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
        if self._writer is not None:
            try:
                await self._writer
            finally:
                self._writer = None
        if self._syncer is not None:
            self._sync_closing = True
            self._sync_wake.set()
            try:
                await self._syncer
            finally:
                self._syncer = None
        if self._connection is not None:
            await self._call(self._close_connection)
        self._executor.shutdown(wait=True)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private(self.path)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from None
        if self._reserve_size and _free_bytes(self.path.parent) < self._reserve_size:
            # Started on a full disk: what the reserve holds is needed now, by this very start.
            self.disk_full = True
            self._reserve_path.unlink(missing_ok=True)
        try:
            connection.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")  # a CLI may hold a write
            # Before anything writes to the file (switching to WAL does).
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"{self.path}: written by a newer relayd (schema {version});"
                    " refusing to touch it"
                )
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise OutboxError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            # FULL: a committed notification survives power loss, not only a killed process.
            connection.execute("PRAGMA synchronous = FULL")
            # Checkpoints fsync: the writer runs them in the thread (see _checkpoint), so that
            # none happens inside a commit made on the event loop.
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            # When SQLite starts the WAL over after a checkpoint, the file is cut back to this:
            # below the checkpoint size, so that the file's growth shows what was written since.
            connection.execute(f"PRAGMA journal_size_limit = {self._wal_limit // 2}")
            connection.execute("BEGIN IMMEDIATE")  # proves the file is writable, now, not later
            # Not executescript(): it would commit the transaction opened above.
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            _migrate(connection)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if self._recover:
                connection.execute(
                    "UPDATE deliveries SET state = ? WHERE state = ?",
                    (State.PENDING.value, State.INFLIGHT.value),
                )
            connection.execute("COMMIT")
            # From here on a transaction on the loop never waits for a lock: it moves to the
            # thread instead (see _commit).
            connection.execute("PRAGMA busy_timeout = 0")
            self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            for suffix in ("-wal", "-shm"):  # SQLite gives them the database file's mode
                with contextlib.suppress(OSError):
                    os.chmod(f"{self.path}{suffix}", 0o600)
        except OSError as exc:
            connection.close()
            raise OutboxError(f"{self.path}: cannot open the outbox's WAL: {exc}") from None
        except sqlite3.DatabaseError as exc:
            connection.close()
            raise OutboxError(f"{self.path}: not a usable SQLite outbox: {exc}") from None
        except OutboxError:
            connection.close()
            raise
        self._connection = connection
        if not self.disk_full:
            self.disk_full = not self._take_reserve()

    # -- the disk reserve ------------------------------------------------------------------------
    #
    # A file of `disk_reserve` bytes of zeros beside the database. When a write finds the disk
    # full, the file is deleted and the WAL checkpointed and truncated: that gives back the
    # room for what is stored to be delivered (claims and results change rows in place, in a WAL
    # kept small), while new notifications wait in their sockets until there is room again.

    def _take_reserve(self) -> bool:
        """Make sure the reserve is on disk; False when the disk has no room for it."""
        if not self._reserve_size:
            return True
        try:
            if self._reserve_path.stat().st_size >= self._reserve_size:
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # Real zeros, not a hole: a sparse file would reserve nothing.
                block = bytes(1 << 20)
                left = self._reserve_size
                while left > 0:
                    left -= os.write(fd, block[: min(left, len(block))])
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
            return False
        return True

    def _give_up_reserve(self) -> None:
        """The disk is full: free the reserve, and fold the WAL into the database file."""
        with contextlib.suppress(OSError):
            self._reserve_path.unlink()
        self._checkpoint(truncate=True)

    def _look_for_room(self) -> bool:
        """While full: True (and the reserve taken again) once the disk has room for it twice."""
        needed = 2 * max(self._reserve_size, self._wal_limit)
        if _free_bytes(self.path.parent) < needed:
            return False
        return self._take_reserve()

    def _sync_wal(self) -> None:
        """Sync the WAL to disk: what `synchronous = FULL` does at the end of each commit.

        A commit with `synchronous = NORMAL` has written its frames to the WAL (it survives a
        killed process), and syncing the file then makes it survive a power cut too. SQLite
        never replaces the WAL file while a connection (ours) holds the database open.
        fdatasync, as SQLite's own sync on Linux: the frames and the file's size reach the disk,
        the modification time need not (measured here: p99 3.0 ms against fsync's 5.3 ms).
        """
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            # The rows are committed but perhaps not on disk: the syncer makes the store
            # unhealthy, naming the file, until a sync works again.
            raise OutboxError(
                f"{self.path}: cannot sync the outbox to disk: {exc}", disk_full=_disk_full(exc)
            ) from None

    def _close_connection(self) -> None:
        assert self._connection is not None
        self._connection.close()
        self._connection = None
        os.close(self._wal_fd)

    async def _call(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    # -- group commit ----------------------------------------------------------------------------

    async def _submit(
        self,
        operation: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = False,
        heavy: bool = False,
        deferrable: bool = False,
        after: Callable[[bool, Any], None] | None = None,
    ) -> T:
        """Run `operation` in the next group commit.

        `durable` operations (new notifications, repairs) make their commit synced to disk: in
        the commit itself in the thread, or by the syncer right after one on the loop. The
        rest (claims, attempt results) need not survive a power cut: a lost "in flight" mark is
        recovered at start, a lost "delivered" mark means one more delivery, which receivers
        dedupe on webhook-id. WAL keeps commits in order either way, and the next sync covers
        every commit before it. `heavy` operations may read or change much of the table.
        `deferrable` ones wait a few milliseconds for company (see `record`).
        """
        if self._commits.closing or self._writer is None:
            error = OutboxError(f"{self.path}: the outbox is closed")
            if after is not None:
                after(False, error)
            raise error
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._commits.put(_Queued(operation, future, durable, heavy, after), deferrable=deferrable)
        return await future

    async def _write_loop(self) -> None:
        while (batch := await self._commits.next_batch()) is not None:
            try:
                await self._commit(
                    batch,
                    durable=any(queued.durable for queued in batch),
                    in_thread=any(queued.heavy for queued in batch),
                )
                if self._checkpoint_due():
                    # Shielded like a commit: the thread finishes it whatever happens here.
                    await asyncio.shield(self._call(self._checkpoint))
            except Exception as exc:
                # The writer is the store's only way in: it must outlive anything it meets, or
                # every caller would wait for ever. Whoever was not answered hears the error.
                log.exception("the outbox writer met an unexpected error; it goes on")
                for queued in batch:
                    if not queued.future.done():
                        queued.future.set_exception(self._error(exc))

    async def _sync_loop(self) -> None:
        """Sync the WAL to disk after durable commits made on the loop, beside the writer.

        A notification's commit is in the WAL when its watcher hears "stored" and its dispatcher
        gets it: safe from a killed relayd, and a power cut would take it with whatever was
        still in the inbox (RAM) anyway. The sync (the disk's cache flush, 0.6 ms at p50 and
        2-4 ms at p99 on the benchmark machine, more on a busy disk) then runs here, once for
        every commit made since the last one began, while the writer goes on committing: it
        is no longer part of every notification's latency, nor does a drive's next commit wait
        for it. A sync that fails makes the store unhealthy (readiness, metrics, one log line)
        until one works again.
        """
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            if self._unsynced:
                self._unsynced = False
                try:
                    # Shielded like a commit: the thread finishes it whatever happens here.
                    await asyncio.shield(self._call(self._sync_wal))
                except OutboxError as failure:
                    self._sync_failure(failure)
                except Exception:  # the syncer must outlive anything, like the writer
                    log.exception("the outbox syncer met an unexpected error; it goes on")
                else:
                    if self._sync_failed:
                        self._sync_failed = False
                        self._recovered()
            if self._sync_closing and not self._unsynced:
                return

    def _sync_failure(self, failure: OutboxError) -> None:
        self.failures += 1
        self.last_error = str(failure)
        if not self._sync_failed:
            self._sync_failed = True
            if self.failing_since is None:
                self.failing_since = time.time()
            # The rows are committed and being delivered; a power cut before a sync that works
            # could take those not yet delivered. Nothing relayd can write again is safer: after
            # a failed sync the kernel may have dropped the pages (PostgreSQL's "fsyncgate").
            log.error("the outbox cannot be synced to disk", error=self.last_error)

    def _changes(self) -> int:
        return self._connection.total_changes if self._connection is not None else 0

    def _checkpoint_due(self) -> bool:
        """After so many changed rows, or once so many bytes of WAL were written since the last
        checkpoint. The file's size alone does not say that: it stays as large as it once grew
        (cut back only to journal_size_limit) while SQLite writes it over from the start."""
        changed = self._changes() - self._checkpointed_at
        if changed >= CHECKPOINT_AFTER_CHANGES:
            return True
        if not changed:
            return False
        try:
            size = os.fstat(self._wal_fd).st_size
        except OSError:
            return False
        if size < self._wal_base:  # cut back: SQLite started the WAL over, writing from its start
            self._wal_base = 0
        limit = (
            min(self._wal_limit, WAL_CHECKPOINT_BYTES_FULL) if self.disk_full else self._wal_limit
        )
        # A start-over that did not shrink the file goes unseen: then this waits for at most
        # journal_size_limit (half the limit) more than it should.
        return size - self._wal_base >= limit

    def _checkpoint(self, *, truncate: bool = False) -> None:
        """Copy the WAL back into the database file, so that it stops growing.

        PASSIVE never waits for a lock; what it cannot copy now, the next one does. A failure
        loses nothing (the WAL still holds every commit) and is retried after as many changes
        again. TRUNCATE (when the disk is full) also empties the WAL file at once.
        """
        self._checkpointed_at = self._changes()
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                mode = "TRUNCATE" if truncate else "PASSIVE"
                self._connection.execute(f"PRAGMA wal_checkpoint({mode})")
                self.checkpoints += 1
        with contextlib.suppress(OSError):
            self._wal_base = os.fstat(self._wal_fd).st_size

    async def _commit(
        self,
        batch: list[_Queued],
        *,
        durable: bool,
        in_thread: bool,
    ) -> None:
        operations = [queued.operation for queued in batch]
        commit_error: OutboxError | None = None
        try:
            outcomes = None if in_thread else self._run_batch(operations, False, wait=False)
            # Shielded: a cancelled writer must still learn how the transaction ended, so that no
            # caller is told "written" for a row that is not, or the reverse.
            if outcomes is None:  # in the thread, or on the loop but a CLI command holds the lock
                outcomes = await asyncio.shield(
                    self._call(lambda: self._run_batch_waiting(operations, durable))
                )
            elif durable:
                # Committed on the loop without a sync: the rows are in the WAL, safe from a
                # killed process. The syncer puts them on disk beside the writer (see _sync_loop).
                self._unsynced = True
                self._sync_wake.set()
        except Exception as exc:
            # A failed commit (disk full, say) fails this batch only: its callers still hold
            # their rows and try again, and the next batch may well succeed.
            commit_error = exc if isinstance(exc, OutboxError) else self._error(exc)
            outcomes = [(False, commit_error)] * len(batch)
        except BaseException:
            closing = OutboxError(f"{self.path}: the outbox is closing")
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(closing)
            self._tell_after(batch, [(False, closing)] * len(batch))
            raise
        # Callers only ever see OutboxError, whatever SQLite raised inside one operation.
        outcomes = [
            (ok, value if ok or isinstance(value, OutboxError) else self._error(value))
            for ok, value in outcomes
        ]
        # One operation failing alone (its commit went through) says nothing of the store's
        # health, unless what failed it was the disk.
        failure = commit_error or next(
            (value for ok, value in outcomes if not ok and value.disk_full), None
        )
        if failure is None:
            self._recovered()
        else:
            await self._failed(failure, whole_commit=commit_error is not None)
        self._tell_after(batch, outcomes)
        for future, (ok, value) in zip((q.future for q in batch), outcomes, strict=True):
            if future.done():  # the caller gave up waiting; the work is done all the same
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    def _tell_after(batch: list[_Queued], outcomes: list[tuple[bool, Any]]) -> None:
        for queued, (ok, value) in zip(batch, outcomes, strict=True):
            if queued.after is not None:
                try:
                    queued.after(ok, value)
                except Exception:
                    log.exception("an outbox commit's follow-up failed")

    def _error(self, exc: BaseException) -> OutboxError:
        return OutboxError(f"{self.path}: {exc}", disk_full=_disk_full(exc))

    async def _failed(self, failure: OutboxError, *, whole_commit: bool) -> None:
        self.failures += 1
        self.last_error = str(failure)
        if whole_commit and self.failing_since is None:
            self.failing_since = time.time()
            log.error("the outbox cannot be written", error=self.last_error)
        if failure.disk_full and not self.disk_full:
            self.disk_full = True
            log.error(
                "the disk under the outbox is full: new notifications wait in their sockets"
                " until there is room; what is stored is still delivered",
                path=str(self.path.parent),
                reserve_released=self._reserve_size,
            )
            await asyncio.shield(self._call(self._give_up_reserve))

    def _recovered(self) -> None:
        # A commit that went through says nothing of a disk that failed its last sync.
        if self.failing_since is not None and not self._sync_failed:
            log.info(
                "the outbox is written again",
                after_seconds=round(time.time() - self.failing_since, 1),
            )
            self.failing_since = None

    def _run_batch_waiting(
        self, operations: Sequence[Operation], durable: bool
    ) -> list[tuple[bool, Any]]:
        outcomes = self._run_batch(operations, durable, wait=True)
        assert outcomes is not None  # waiting, a lock still held is an error, not None
        return outcomes

    def _run_batch(
        self, operations: Sequence[Operation], durable: bool, *, wait: bool
    ) -> list[tuple[bool, Any]] | None:
        """One transaction for the batch, fsynced if `durable`.

        `wait`: wait up to LOCK_WAIT_MS for another process's write lock (only in the thread).
        Without it, a held lock returns None at once and nothing has happened.
        """
        connection = self._connection
        if connection is None:
            raise OutboxError(f"{self.path}: the outbox is closed")
        try:
            if durable != self._synchronous_full:
                connection.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._synchronous_full = durable
            if wait:
                connection.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")
                try:
                    connection.execute("BEGIN IMMEDIATE")
                finally:
                    connection.execute("PRAGMA busy_timeout = 0")
            else:
                try:
                    connection.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if _busy(exc):
                        return None
                    raise
            # One savepoint for the batch: undoing it keeps the write lock, which a ROLLBACK
            # would give up (and on the loop, nothing may wait to take it again).
            connection.execute("SAVEPOINT batch")
            try:
                # The usual case: every operation succeeds, one transaction, nothing else.
                outcomes: list[tuple[bool, Any]] = [(True, op(connection)) for op in operations]
            except Exception as exc:
                if not wait and _busy(exc):
                    # Another process holds a lock (SQLite recovering the WAL, say): undo it all
                    # and run the batch again in the thread, where waiting is allowed.
                    connection.execute("ROLLBACK")
                    return None
                # Something failed: start again with a savepoint around each operation, so that
                # only the failing one is undone and told so.
                connection.execute("ROLLBACK TO batch")
                outcomes = [self._isolated(connection, op) for op in operations]
            connection.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise OutboxError(
                f"{self.path}: commit failed: {exc}", disk_full=_disk_full(exc)
            ) from None
        return outcomes

    @staticmethod
    def _isolated(connection: sqlite3.Connection, operation: Operation) -> tuple[bool, Any]:
        connection.execute("SAVEPOINT operation")
        try:
            value = operation(connection)
        except Exception as exc:
            connection.execute("ROLLBACK TO operation")
            return False, exc
        finally:
            connection.execute("RELEASE operation")
        return True, value

    # -- the daemon's operations -----------------------------------------------------------------

    async def add(self, deliveries: Sequence[NewDelivery], *, fence: Fence | None = None) -> None:
        """Returns once the rows are committed to disk."""
        if deliveries:
            await self._insert(deliveries, None)

    async def _insert(
        self,
        deliveries: Sequence[NewDelivery],
        also: Callable[[sqlite3.Connection], None] | None,
    ) -> None:
        """Commit new rows (and `also`, in the same transaction), then route them."""
        if deliveries and self.disk_full and not await self._room_again():
            raise OutboxFull(
                f"{self.path}: the disk is full; new notifications wait until there is room",
                disk_full=True,
            )
        plan = InsertPlan.plan(deliveries, self._router)

        def insert(connection: sqlite3.Connection) -> list[list[Delivery]]:
            handed = _run_insert(plan, connection)
            if also is not None:
                also(connection)
            return handed

        def route(ok: bool, handed: Any) -> None:
            # Run by the writer as the commit ends, whether or not this caller still waits (a
            # watcher stopped mid-commit): committed rows always reach a dispatcher or the queue.
            self._requeue(plan.announce(self._router, handed if ok else None))

        await self._submit(
            insert,
            durable=True,
            heavy=len(deliveries) + int(also is not None) > INLINE_ROWS,
            after=route,
        )

    def _requeue(self, refused: list[Delivery]) -> None:
        """Put rows a stopped dispatcher refused back in the queue, as an operation of the
        writer's own, and wake their webhooks: a reload's new dispatcher claims them."""
        if not refused:
            return

        def woken(ok: bool, error: Any) -> None:
            if not ok:
                # They stay in flight on disk, which the next start puts back in the queue:
                # nothing is lost, and the notifications themselves are committed.
                log.error("cannot put refused rows back in the queue", error=str(error))
            elif self._router is not None:
                for webhook in {row.webhook for row in refused}:
                    self._router.wake(webhook)

        # Queued directly (this runs in the writer's follow-up, which cannot await): nobody
        # awaits the future, `woken` hears the outcome, and it is marked as seen so that an
        # error on it is not reported again as never retrieved.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        operation = _back_to_pending(row.id for row in refused)
        self._commits.put(_Queued(operation, future, False, False, woken))

    async def _room_again(self) -> bool:
        """While full, at most once a second: is there room (and the reserve back) now?"""
        if time.monotonic() - self._room_checked < ROOM_CHECK_INTERVAL:
            return False
        self._room_checked = time.monotonic()
        if not await self._call(self._look_for_room):
            return False
        self.disk_full = False
        log.info("the disk under the outbox has room again: new notifications are stored")
        return True

    async def claim(self, webhook: str, limit: int, *, ordered: bool = False) -> list[Delivery]:
        """Take up to `limit` rows that are due now and mark them in flight.

        Ordered webhooks get only the oldest waiting row, and only when nothing is in flight, so
        a retrying row holds back everything behind it. A `retry_from` in the future (written
        while the clock ran ahead) becomes now, on disk too: max_age counts from there, and
        would otherwise not start until the clock caught up.
        """
        now = self._clock()

        def take(connection: sqlite3.Connection) -> list[Delivery]:
            if ordered:
                busy = connection.execute(
                    "SELECT 1 FROM deliveries WHERE webhook = ? AND state = ? LIMIT 1",
                    (webhook, State.INFLIGHT.value),
                ).fetchone()
                if busy:
                    return []
                rows = connection.execute(
                    f"SELECT {_ROW_COLUMNS}, next_attempt FROM deliveries"
                    " WHERE webhook = ? AND state = ? ORDER BY id LIMIT 1",
                    (webhook, State.PENDING.value),
                ).fetchall()
                rows = [row[:-1] for row in rows if row[-1] <= now]
            else:
                rows = connection.execute(
                    f"SELECT {_ROW_COLUMNS} FROM deliveries WHERE webhook = ? AND state = ?"
                    " AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?",
                    (webhook, State.PENDING.value, now, limit),
                ).fetchall()
            connection.executemany(
                "UPDATE deliveries SET state = ?, retry_from = MIN(retry_from, ?) WHERE id = ?",
                [(State.INFLIGHT.value, now, row[0]) for row in rows],
            )
            return [
                Delivery(
                    row_id, message_id, name, drive, body, created, min(retry_from, now), attempts
                )
                for row_id, message_id, name, drive, body, created, retry_from, attempts in rows
            ]

        return await self._submit(take)

    async def next_due(
        self, webhook: str, *, ordered: bool = False, horizon: float | None = None
    ) -> float | None:
        """When `claim` will next have a row for the webhook, if any waits.

        For an ordered webhook that is when the oldest waiting row becomes due, and never while
        a row is in flight: rows behind the head are not claimable however long they have waited.

        `horizon` is the webhook's `retry.max_delay`: no backoff sets a retry further ahead than
        that, so a row due later was written while the clock ran ahead. Such rows are made due
        now first (and their `retry_from` too, if it lies ahead), instead of waiting for the
        clock to catch up. One index lookup when there are none.
        """
        now = self._clock()

        def query(connection: sqlite3.Connection) -> float | None:
            if horizon is not None:
                _due_now_if_beyond(connection, webhook, now, horizon)
            if ordered:
                if connection.execute(
                    "SELECT 1 FROM deliveries WHERE webhook = ? AND state = ? LIMIT 1",
                    (webhook, State.INFLIGHT.value),
                ).fetchone():
                    return None
                row = connection.execute(
                    "SELECT next_attempt FROM deliveries WHERE webhook = ? AND state = ?"
                    " ORDER BY id LIMIT 1",
                    (webhook, State.PENDING.value),
                ).fetchone()
                return None if row is None else float(row[0])
            row = connection.execute(
                "SELECT MIN(next_attempt) FROM deliveries WHERE webhook = ? AND state = ?",
                (webhook, State.PENDING.value),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._submit(query)

    async def record(self, results: Iterable[AttemptResult]) -> None:
        """Store what attempts came to: delivered, dead, or pending again with a next attempt."""
        results = list(results)
        rows, failed = result_rows(results), failed_attempt_rows(results)

        def update(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE deliveries SET state = ?, next_attempt = ?, attempts = attempts + 1,"
                " last_attempt = ?, last_status = ?, last_error = ?, last_latency = ?,"
                " last_response = ?, finished = ? WHERE id = ?",
                rows,
            )
            if failed:
                connection.executemany(
                    "INSERT INTO attempts (delivery_id, at, status, error, latency, response)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    failed,
                )

        # Deferrable: the dispatcher's slot is already free and nothing waits on this commit
        # except the attempt's own task. A claim (an ordered webhook's next one included) or a
        # new notification commits it at once, along with itself.
        await self._submit(update, deferrable=True)

    async def release(self, ids: Iterable[int]) -> None:
        """Put claimed rows back untouched (a shutdown interrupted their attempt)."""
        await self._submit(_back_to_pending(ids))

    async def prune(self, delivered_before: float) -> int:
        """Forget delivered rows that finished before the given time."""

        def delete(connection: sqlite3.Connection) -> int:
            where = "state = ? AND finished < ?"
            params = (State.DELIVERED.value, delivered_before)
            _delete_attempts(connection, where, params)
            cursor = connection.execute(f"DELETE FROM deliveries WHERE {where}", params)
            return cursor.rowcount

        return int(await self._submit(delete, heavy=True))

    async def backlog(self) -> Backlog:
        """Rows waiting (pending or in flight) per webhook and drive, the oldest one's creation
        time, and the dead letters per webhook.

        Cheap at any size of history: it reads only waiting and dead rows, through the indexes.
        """

        def query(connection: sqlite3.Connection) -> Backlog:
            counts: dict[str, int] = {}
            oldest: dict[str, float] = {}
            per_drive: dict[str, int] = {}
            for webhook, drive, count, created in connection.execute(
                "SELECT webhook, drive, COUNT(*), MIN(created) FROM deliveries"
                " WHERE state IN ('pending', 'inflight') GROUP BY webhook, drive"
            ):
                counts[webhook] = counts.get(webhook, 0) + count
                oldest[webhook] = min(oldest.get(webhook, created), created)
                per_drive[drive] = per_drive.get(drive, 0) + count
            dead = dict(
                connection.execute(
                    "SELECT webhook, COUNT(*) FROM deliveries"
                    " WHERE state = 'dead' AND finished IS NOT NULL GROUP BY webhook"
                ).fetchall()
            )
            return Backlog(counts=counts, oldest=oldest, per_drive=per_drive, dead=dead)

        return await self._submit(query, heavy=True)

    async def drive_state(self, name: str) -> tuple[str, str | None] | None:
        """(resource, delta cursor) remembered for a drive, or None for a drive never seen."""

        def query(connection: sqlite3.Connection) -> tuple[str, str | None] | None:
            row = connection.execute(
                "SELECT resource, cursor FROM drives WHERE name = ?", (name,)
            ).fetchone()
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
        """Remember a drive's cursor, together with the deliveries it produced, atomically.

        A delta page and the cursor that follows it are committed in one transaction: after a
        crash either both are on disk, or neither is and the page is fetched again.
        """
        now = self._clock()

        def upsert(connection: sqlite3.Connection) -> None:
            # A drive id belongs to the resource it was resolved from: another resource drops it.
            connection.execute(
                "INSERT INTO drives (name, resource, cursor, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET resource = excluded.resource,"
                " cursor = excluded.cursor, updated = excluded.updated,"
                " drive_id = CASE WHEN drives.resource = excluded.resource"
                " THEN drives.drive_id END",
                (name, resource, cursor, now),
            )

        await self._insert(deliveries, upsert)

    async def drive_id(self, name: str) -> tuple[str, str] | None:
        """(resource, drive id) remembered for a drive, or None if it was never resolved."""

        def query(connection: sqlite3.Connection) -> tuple[str, str] | None:
            row = connection.execute(
                "SELECT resource, drive_id FROM drives WHERE name = ? AND drive_id IS NOT NULL",
                (name,),
            ).fetchone()
            return None if row is None else (row[0], row[1])

        return await self._submit(query)

    async def save_drive_id(self, name: str, resource: str, drive_id: str) -> None:
        """Remember what a drive's resource resolved to. A drive seen before with another
        resource starts over: its delta cursor belonged to the other drive."""
        now = self._clock()

        def upsert(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO drives (name, resource, cursor, updated, drive_id)"
                " VALUES (?, ?, NULL, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET drive_id = excluded.drive_id,"
                " updated = excluded.updated,"
                " cursor = CASE WHEN drives.resource = excluded.resource THEN drives.cursor END,"
                " resource = excluded.resource",
                (name, resource, now, drive_id),
            )

        await self._insert((), upsert)

    # -- inspection and repair (the `relayd outbox` commands; safe beside a running daemon) -----

    async def summary(self, selection: Filter = EVERYTHING) -> Summary:
        where, params = selection.where()

        def query(connection: sqlite3.Connection) -> Summary:
            counts = {
                (webhook, State(state)): count
                for webhook, state, count in connection.execute(
                    f"SELECT webhook, state, COUNT(*) FROM deliveries WHERE {where}"
                    " GROUP BY webhook, state",
                    params,
                )
            }
            oldest = dict(
                connection.execute(
                    f"SELECT webhook, MIN(created) FROM deliveries WHERE {where} AND state IN"
                    " ('pending', 'inflight') GROUP BY webhook",
                    params,
                ).fetchall()
            )
            return Summary(counts=counts, oldest_pending=oldest)

        return await self._submit(query, heavy=True)

    async def row(self, row_id: int) -> dict[str, Any] | None:
        """One row with its body and every attempt (oldest first), for `relayd outbox show`."""

        def query(connection: sqlite3.Connection) -> dict[str, Any] | None:
            cursor = connection.execute("SELECT * FROM deliveries WHERE id = ?", (row_id,))
            found = cursor.fetchone()
            if found is None:
                return None
            row = dict(zip([column[0] for column in cursor.description], found, strict=True))
            attempts = [
                {"at": at, "status": status, "error": error, "latency": latency, "response": text}
                for at, status, error, latency, text in connection.execute(
                    "SELECT at, status, error, latency, response FROM attempts"
                    " WHERE delivery_id = ? ORDER BY at, rowid",
                    (row_id,),
                )
            ]
            return with_attempt_log(row, attempts)

        return await self._submit(query)

    async def names(self) -> tuple[set[str], set[str]]:
        """The webhooks and drives that have rows, for telling a mistyped name from an empty
        selection."""

        def query(connection: sqlite3.Connection) -> tuple[set[str], set[str]]:
            webhooks = {
                name for (name,) in connection.execute("SELECT DISTINCT webhook FROM deliveries")
            }
            drives = {
                name for (name,) in connection.execute("SELECT DISTINCT drive FROM deliveries")
            }
            return webhooks, drives

        return await self._submit(query, heavy=True)

    async def rows(
        self, selection: Filter = EVERYTHING, *, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Rows without their bodies, newest first, for `relayd outbox list`."""
        where, params = selection.where()

        def query(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = connection.execute(
                "SELECT id, message_id, webhook, drive, state, created, attempts, next_attempt,"
                " last_attempt, last_status, last_error, last_latency, last_response"
                f" FROM deliveries WHERE {where} ORDER BY id DESC LIMIT ?",
                [*params, limit],
            )
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor]

        return await self._submit(query, heavy=True)

    async def replay(self, selection: Filter, *, dry_run: bool = False) -> int:
        """Put dead rows back in the queue, due now, with a fresh max_age and backoff.

        `attempts` restarts from zero, so the first retry after a replay waits `initial_delay`,
        not the `max_delay` the row had reached before it died. Waiting rows are reached only
        when the selection asks for them (`state=PENDING`): they become due now, with the same
        fresh start. Rows in flight are a dispatcher's, and never touched.
        """
        state = selection.state or State.DEAD
        if state not in REPLAYABLE:
            what = "rows in flight" if state is State.INFLIGHT else f"{state.value} ones"
            raise ValueError(f"replay reaches dead or pending rows, not {what}")
        where, params = replace(selection, state=state).where()
        return await self._make_due(where, params, dry_run=dry_run)

    async def resend(self, selection: Filter, *, dry_run: bool = False) -> int:
        """Send finished rows again (Svix's "resend"): delivered ones, dead ones or both (the
        default), due now with a fresh max_age and backoff, and the same webhook-id. What they
        were sent and answered before stays in their attempts."""
        if selection.state is not None and selection.state not in RESENDABLE:
            raise ValueError(f"resend reaches delivered or dead rows, not {selection.state.value}")
        where, params = selection.where()
        if selection.state is None:
            where += " AND state IN ('delivered', 'dead') AND finished IS NOT NULL"
        return await self._make_due(where, params, dry_run=dry_run)

    async def _make_due(self, where: str, params: list[Any], *, dry_run: bool) -> int:
        if dry_run:
            return await self._count(where, params)
        now = self._clock()

        def update(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                "UPDATE deliveries SET state = ?, next_attempt = ?, retry_from = ?,"
                f" finished = NULL, attempts = 0 WHERE {where}",
                [State.PENDING.value, now, now, *params],
            )
            return cursor.rowcount

        return int(await self._submit(update, durable=True, heavy=True))

    async def _count(self, where: str, params: list[Any]) -> int:
        def query(connection: sqlite3.Connection) -> int:
            return int(
                connection.execute(
                    f"SELECT COUNT(*) FROM deliveries WHERE {where}", params
                ).fetchone()[0]
            )

        return await self._submit(query, heavy=True)

    async def purge(self, selection: Filter, *, dry_run: bool = False) -> int:
        """Delete the selected rows that are finished (dead or delivered).

        Waiting rows only when the selection asks for them (`state=PENDING`): those no
        dispatcher holds, since a claim marks a row in flight in the same transaction that
        hands it out. Rows in flight are never deleted.
        """
        if selection.state is State.INFLIGHT:
            raise ValueError("purge never deletes rows in flight: a dispatcher holds them")
        where, params = selection.where()
        if selection.state is None:
            where += " AND state IN ('dead', 'delivered') AND finished IS NOT NULL"

        if dry_run:
            return await self._count(where, params)

        def delete(connection: sqlite3.Connection) -> int:
            _delete_attempts(connection, where, params)
            cursor = connection.execute(f"DELETE FROM deliveries WHERE {where}", params)
            return cursor.rowcount

        # Durable when it deletes waiting rows: a power cut must not bring them back to be sent.
        durable = selection.state is State.PENDING
        return int(await self._submit(delete, durable=durable, heavy=True))


def _delete_attempts(connection: sqlite3.Connection, where: str, params: Sequence[Any]) -> None:
    """The attempts of the rows `where` selects, deleted before the rows themselves: a row id
    can be used again once its row is gone."""
    connection.execute(
        f"DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE {where})",
        params,
    )
