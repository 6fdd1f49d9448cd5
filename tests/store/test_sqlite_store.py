"""The SQLite store's own nature: fsync, WAL, another process's write lock, files that cannot be
used. What both backends share is in test_store_common.py."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from store_rows import T0, Clock, new, result
from support.waiting import wait_until

from relayd.store import Delivery, Fence, NewDelivery, OutboxError, SqliteStore, State
from relayd.store.sqlite import LOCK_WAIT_MS


def on_disk(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Read the file with a connection of our own, as another process would."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite3"


@pytest.fixture
async def outbox(path: Path, clock: Clock) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(path, clock=clock) as store:
        yield store


# -- writing ------------------------------------------------------------------------------------


async def test_a_commit_is_stored_and_delivered_while_its_disk_sync_is_under_way(
    outbox: SqliteStore, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk cannot be made here: os.fdatasync is held instead, as a slow disk holds it.
    real_fdatasync = os.fdatasync
    syncing, release = threading.Event(), threading.Event()

    def slow_fdatasync(fd: int) -> None:
        syncing.set()
        release.wait(20)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    await outbox.add([new(1)])
    await wait_until(syncing.is_set, timeout=5, what="the sync of the first commit")
    # The sync is still under way: the next commit, and a dispatcher's claim, do not wait for it.
    await outbox.add([new(2)])
    claimed = await outbox.claim("hook", 10)
    assert [row.message_id for row in claimed] == ["msg_hook_d1_1", "msg_hook_d1_2"]
    release.set()
    await outbox.close()  # ends with the sync of everything committed
    assert len(on_disk(path, "SELECT id FROM deliveries")) == 2


async def test_a_failed_disk_sync_makes_the_store_unhealthy_naming_the_file_until_one_works(
    outbox: SqliteStore, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk error cannot be made to happen here: os.fdatasync is what reports one.
    real_fdatasync = os.fdatasync
    fail = threading.Event()
    fail.set()

    def failing_fdatasync(fd: int) -> None:
        if fail.is_set():
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    await outbox.add([new(1)])  # committed: a killed relayd would still find it
    await wait_until(lambda: not outbox.healthy, timeout=5, what="the failed sync to show")
    assert outbox.last_error is not None
    assert f"{path}: cannot sync the outbox to disk" in outbox.last_error
    await outbox.add([new(2)])  # a commit that works says nothing of the disk's syncs
    assert not outbox.healthy
    fail.clear()
    await outbox.add([new(3)])
    await wait_until(lambda: outbox.healthy, timeout=5, what="a sync that works")
    assert [row.message_id for row in await outbox.claim("hook", 10)] == [
        "msg_hook_d1_1",
        "msg_hook_d1_2",
        "msg_hook_d1_3",
    ]


# -- where transactions run ---------------------------------------------------------------------


async def test_a_cli_holding_the_write_lock_delays_a_claim_without_blocking_the_loop(
    outbox: SqliteStore, path: Path
) -> None:
    await outbox.add([new(1)])
    cli = sqlite3.connect(path, isolation_level=None)
    try:
        cli.execute("BEGIN IMMEDIATE")  # what `relayd outbox replay` holds while it works
        claim = asyncio.create_task(outbox.claim("hook", 10))
        started = time.monotonic()
        for _ in range(20):  # the writer takes its turn, and the loop goes on turning
            await asyncio.sleep(0)
        # The claim found the lock taken and went to wait in the outbox's thread: the event loop
        # (every drive's socket) did not wait with it.
        assert time.monotonic() - started < LOCK_WAIT_MS / 1000 / 2
        assert not claim.done()
        cli.execute("COMMIT")
        assert [row.id for row in await asyncio.wait_for(claim, 5)] == [1]
    finally:
        cli.close()


async def test_the_wal_is_copied_back_as_rows_change_so_it_stops_growing(
    outbox: SqliteStore, path: Path
) -> None:
    wal = path.with_name(path.name + "-wal")
    body = b"x" * 1024
    written = 0
    for batch in range(60):
        await outbox.add(
            [NewDelivery(f"msg_{batch}_{n}", "hook", "d1", body, T0) for n in range(200)]
        )
        claimed = await outbox.claim("hook", 200)
        await outbox.record(result(row, State.DELIVERED) for row in claimed)
        written += 3 * len(claimed) * len(body)  # each row written three times, at least

    assert outbox.checkpoints >= 5
    # Without checkpoints the WAL holds every version of every row; with them it is reused.
    assert wal.stat().st_size < written / 4


async def test_a_wal_file_that_once_grew_large_does_not_make_every_commit_checkpoint(
    path: Path,
) -> None:
    """The WAL file keeps its size while SQLite writes it over from the start: checkpoints
    follow what was written since the last one, not the file's size (a checkpoint per commit
    cost a fifth of the relay's throughput)."""
    async with SqliteStore(path, disk_reserve=256 << 10) as outbox:  # checkpoints at 128 KiB of WAL
        big = b"x" * 8192
        await outbox.add([NewDelivery(f"big_{n}", "hook", "d1", big, T0) for n in range(40)])
        assert path.with_name(path.name + "-wal").stat().st_size >= 128 << 10
        before = outbox.checkpoints
        for n in range(100):  # small commits of a few pages each
            await outbox.add([new(n)])
        assert 1 <= outbox.checkpoints - before < 30


async def test_a_store_indexed_by_an_older_relayd_is_upgraded_in_place(path: Path) -> None:
    async with SqliteStore(path) as older:
        await older.add([new(1)])
    connection = sqlite3.connect(path)
    connection.execute("DROP INDEX deliveries_done")
    connection.execute("CREATE INDEX deliveries_finished ON deliveries (state, finished)")
    connection.commit()
    connection.close()

    async with SqliteStore(path) as store:
        assert (await store.summary()).counts == {("hook", State.PENDING): 1}
    indexes = on_disk(
        path, "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'deliveries%'"
    )
    assert sorted(indexes) == [("deliveries_done",), ("deliveries_queue",)]


# -- claiming -----------------------------------------------------------------------------------


# -- restarts -----------------------------------------------------------------------------------


# -- inspection and repair ----------------------------------------------------------------------


# -- unusable stores ----------------------------------------------------------------------------


def outbox_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("relayd-outbox")]


async def test_a_corrupt_file_is_refused_at_open_naming_it(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an outbox\x00\xff" * 500)
    threads = len(outbox_threads())

    with pytest.raises(OutboxError, match="not a usable SQLite outbox") as raised:
        async with SqliteStore(path):
            pass

    assert str(path) in str(raised.value)
    assert len(outbox_threads()) == threads  # the failed open left no worker thread behind


async def test_an_unwritable_location_is_refused_at_open(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a regular file where the state folder should be")
    path = tmp_path / "state" / "outbox.sqlite3"

    with pytest.raises(OutboxError, match="cannot open the outbox") as raised:
        async with SqliteStore(path):
            pass

    assert str(path) in str(raised.value)


async def test_a_store_from_a_newer_relayd_is_refused_and_left_untouched(path: Path) -> None:
    path.parent.mkdir(parents=True)
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE future (x)")
    connection.execute("PRAGMA user_version = 99")
    connection.commit()
    connection.close()
    before = path.read_bytes()

    with pytest.raises(OutboxError, match="newer relayd") as raised:
        async with SqliteStore(path):
            pass

    assert str(path) in str(raised.value)
    assert "99" in str(raised.value)
    assert path.read_bytes() == before  # not even switched to WAL


class _Dispatcher:
    """The dispatcher's side of a reservation (relayd.delivery's, reduced to what is seen)."""

    count = 1

    def __init__(self) -> None:
        self.handed: list[Delivery] | None = None

    def hand_over(self, rows: list[Delivery]) -> bool:
        self.handed = rows
        return True


class _Router:
    def __init__(self, dispatcher: _Dispatcher) -> None:
        self._dispatcher = dispatcher

    def reserve(self, webhook: str, count: int) -> _Dispatcher:
        return self._dispatcher

    def wake(self, webhook: str) -> None:
        pass


async def test_rows_committed_after_their_writer_stopped_waiting_still_reach_their_dispatcher(
    path: Path,
) -> None:
    """A watcher stopped (cancelled) while its commit waits for a lock: the commit goes through
    all the same, and its rows, inserted in flight for the dispatcher that reserved them, must
    reach it rather than stay in flight for nobody until the next start."""
    dispatcher = _Dispatcher()
    async with SqliteStore(path, router=_Router(dispatcher)) as outbox:
        cli = sqlite3.connect(path, isolation_level=None)
        try:
            cli.execute("BEGIN IMMEDIATE")
            add = asyncio.create_task(outbox.add([new(1)]))
            for _ in range(20):  # the writer takes the batch and sends it to wait in its thread
                await asyncio.sleep(0)
            add.cancel()
            with pytest.raises(asyncio.CancelledError):
                await add
        finally:
            cli.execute("COMMIT")
            cli.close()
        await wait_until(lambda: dispatcher.handed is not None, what="the rows handed over")
    assert dispatcher.handed is not None
    assert [row.message_id for row in dispatcher.handed] == ["msg_hook_d1_1"]
    assert on_disk(path, "SELECT state FROM deliveries") == [("inflight",)]


# -- drive state --------------------------------------------------------------------------------


async def test_fences_are_accepted_and_ignored_one_process_holds_the_state_dir(
    outbox: SqliteStore, path: Path
) -> None:
    """A watcher passes its drive's fence on every write whichever store it has; SQLite has no
    leases to check it against (the state_dir lock keeps any second process out)."""
    stale = Fence("drive:d1", "someone-else", 1)
    await outbox.add([new(1)], fence=stale)
    await outbox.save_drive_state("d1", "me", "cursor", [new(2)], fence=stale)
    assert await outbox.drive_state("d1") == ("me", "cursor")
    assert on_disk(path, "SELECT COUNT(*) FROM deliveries") == [(2,)]
