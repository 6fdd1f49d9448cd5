"""A watcher under faults: a full inbox meeting a reconnect, an account whose token source hangs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartRelay, of_type, seqs
from support.small_disk import SmallDisk
from support.waiting import wait_until

from relayd import watcher as watcher_module
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.watcher import DriveState


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with SmallDisk(tmp_path / "disk", size=16 << 20) as small:
        yield small


@pytest.mark.timeout(90)
async def test_a_reconnect_while_the_inbox_is_full_loses_nothing_and_keeps_the_watcher(
    disk: SmallDisk,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store cannot write (a full disk), so the drive's inbox fills; then the line drops.
    The reconnect's drive.resync must not crash the watcher (it did: QueueFull), and the batch
    its pump was retrying must not be dropped with it."""
    monkeypatch.setattr(watcher_module, "QUEUE_ITEMS", 5)
    relay = await start_relay(state_dir=str(disk.path / "state"))
    await relay.connected()
    disk.fill()
    await emulator.emit("me", 6)  # one with the pump, five waiting: the inbox is full
    watcher = relay.watcher()
    await wait_until(lambda: watcher.status.received == 6, what="6 notifications received")

    await emulator.kick("me")
    await wait_until(lambda: emulator.connects["me"] == 2, timeout=20, what="reconnected")
    await relay.connected()
    disk.empty()

    await wait_until(
        lambda: sorted(seqs(receiver.delivered("hook"))) == [1, 2, 3, 4, 5, 6],
        timeout=30,
        what="all 6 delivered once the disk has room",
    )
    await wait_until(
        lambda: len(of_type(receiver.delivered("hook"), "drive.resync")) == 1,
        what="the reconnect's drive.resync delivered",
    )
    assert relay.watcher() is watcher  # the same watcher throughout: it never crashed
    assert watcher.status.state is DriveState.CONNECTED


@pytest.mark.timeout(60)
async def test_an_account_whose_token_source_hangs_does_not_hold_back_another_accounts_drives(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
) -> None:
    """With one connect slot, drives of an account whose token command hangs must not take it
    while they wait for a token: the other account's drive connects at once."""
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(40)\nprint('never-used')\n")
    (tmp_path / "token").write_text("test-token")
    relay = await start_relay(
        graph={"base_url": emulator.base_url, "connect_concurrency": 1},
        accounts={
            "stuck": {"token_command": f"{sys.executable} {hang}"},
            "test": {"token_file": str(tmp_path / "token")},
        },
        drives=[
            {"name": "s1", "account": "stuck", "resource": "drives/s1", "webhook": "hook"},
            {"name": "s2", "account": "stuck", "resource": "drives/s2", "webhook": "hook"},
            {"name": "ok", "account": "test", "resource": "me", "webhook": "hook"},
        ],
    )
    await relay.connected("ok", timeout=10)
    assert emulator.connected("me") == 1
    assert relay.watcher("s1").status.state is DriveState.STARTING
