"""The TaskGroup's failure mode: no long-lived task's error ends the daemon.

One failing task of a TaskGroup cancels all the others, so every long-lived task (a drive's
watcher, a webhook's dispatcher, the prune and tick loops, the outbox's writer) must survive the
errors it can meet. Each is made to fail here on a running relay, which must go on delivering.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import StartRelay, seqs
from support.waiting import stays_true, wait_until

from relayd import supervisor as supervisor_module
from relayd.delivery import Dispatcher
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.store import SqliteStore
from relayd.store import sqlite as outbox_module
from relayd.watcher import DriveWatcher


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Make `owner.name` raise RuntimeError on its first call; returns the call counter."""
    original: Callable[..., Any] = getattr(owner, name)
    calls = [0]

    def first_fails(self: object, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError(f"injected failure in {owner.__name__}.{name}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, first_fails)
    return calls


# (what fails, the method made to fail once). Coroutine methods fail as they are called, which
# is where an unexpected error would surface.
TASKS = {
    "drive watcher": (DriveWatcher, "run"),
    "webhook dispatcher": (Dispatcher, "run"),
    "prune loop": (SqliteStore, "prune"),
    "tick loop": (SqliteStore, "backlog"),
    "outbox writer": (SqliteStore, "_checkpoint_due"),
}


@pytest.mark.parametrize("task", TASKS)
async def test_a_long_lived_task_that_fails_does_not_end_the_daemon(
    task: str,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_module, "DRIVE_RESTART_DELAY", 0.1)
    monkeypatch.setattr(supervisor_module, "DISPATCHER_RESTART_DELAY", 0.1)
    monkeypatch.setattr(supervisor_module, "PRUNE_RETRY", 0.1)
    monkeypatch.setattr(supervisor_module, "STATUS_INTERVAL", 0.1)
    owner, name = TASKS[task]
    calls = fail_once(monkeypatch, owner, name)
    relay = await start_relay()
    await wait_until(lambda: calls[0] >= 1, what=f"the {task} failed once")
    await relay.connected()
    await emulator.emit("me", 3)
    await wait_until(lambda: seqs(receiver.delivered("hook")) == [1, 2, 3], what="delivered")
    assert not relay.task.done()


@pytest.mark.timeout(30)
async def test_a_store_locked_at_prune_time_is_pruned_later_and_the_daemon_goes_on(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process (a CLI command, a backup) holds the store's write lock for longer than a
    transaction waits, just when the prune runs: the prune fails, is tried again, and nothing
    else stops."""
    monkeypatch.setattr(supervisor_module, "PRUNE_INTERVAL", 0.2)
    monkeypatch.setattr(supervisor_module, "PRUNE_RETRY", 0.2)
    monkeypatch.setattr(outbox_module, "LOCK_WAIT_MS", 100)
    relay = await start_relay(outbox={"delivered_retention": 0, "disk_reserve": 0})
    await relay.connected()
    await emulator.emit("me", 2)
    await wait_until(lambda: len(receiver.delivered("hook")) == 2, what="2 delivered")

    failures: list[str] = []
    original_prune = SqliteStore.prune

    async def watched_prune(self: SqliteStore, delivered_before: float) -> int:
        try:
            return await original_prune(self, delivered_before)
        except Exception as exc:
            failures.append(str(exc))
            raise

    monkeypatch.setattr(SqliteStore, "prune", watched_prune)
    locker = sqlite3.connect(tmp_path / "state" / "outbox.sqlite3", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        await wait_until(lambda: len(failures) >= 2, what="prunes refused by the lock")
        await stays_true(lambda: not relay.task.done(), seconds=0.5, what="the daemon running")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert "locked" in failures[0]

    await emulator.emit("me", 1)
    await wait_until(lambda: len(receiver.delivered("hook")) == 3, what="delivered after")

    def pruned() -> bool:
        with sqlite3.connect(tmp_path / "state" / "outbox.sqlite3") as db:
            return db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0

    await wait_until(pruned, what="delivered rows pruned once the lock is gone")
    assert not relay.task.done()
