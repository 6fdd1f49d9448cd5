"""A full disk under the outbox, on a real daemon: a tmpfs of a few MiB that the test fills.

What a user must see: relayd stays up and says it is in trouble (not ready, the store-error and
disk-full metrics, the notifications it holds in memory); it stops reading sockets rather than
hold more than a bounded amount; what was stored before is still delivered; freeing space
recovers by itself; and a SIGTERM while it holds notifications it could not store says exactly
how many were lost and exits non-zero.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import seqs
from support.daemon import Daemon, free_port, outbox_rows, write_daemon_config
from support.small_disk import SmallDisk
from support.waiting import eventually, wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ScriptedResponse
from relayd.supervisor import EXIT_LOST

DISK = 24 << 20
RESERVE = 2 << 20

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with SmallDisk(tmp_path / "disk", size=DISK) as small:
        yield small


@pytest.fixture
async def daemon(
    tmp_path: Path, disk: SmallDisk, emulator: GraphEmulator, receiver: WebhookReceiver
) -> AsyncIterator[Daemon]:
    port = free_port()
    config = write_daemon_config(
        tmp_path / "relayd.yaml",
        emulator,
        receiver,
        state_dir=disk.path / "state",
        admin_port=port,
        outbox={"disk_reserve": RESERVE},
    )
    relay = Daemon(config, port, wrap=disk.command)
    yield relay
    await relay.stop()


async def started(daemon: Daemon, emulator: GraphEmulator) -> None:
    await daemon.start()
    await wait_until(lambda: emulator.connected("me") == 1, timeout=30, what="relay connected")
    await eventually(lambda: _ready(daemon, True), timeout=20, what="/readyz ready once connected")


async def _ready(daemon: Daemon, expected: bool) -> bool:
    code, _ = await daemon.get("/readyz")
    return (code == 200) is expected


async def test_a_full_disk_is_said_loudly_delivery_goes_on_and_room_recovers_by_itself(
    disk: SmallDisk, daemon: Daemon, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    state = disk.path / "state"
    receiver.set_default("hook", ScriptedResponse(status=503))  # the webhook is down
    await started(daemon, emulator)
    await emulator.emit("me", 30)
    await wait_until(lambda: sum(outbox_rows(state).values()) == 30, what="30 stored")

    disk.fill()  # nothing left: the next write fails with "database or disk is full"
    await emulator.emit("me", 20)

    # Loud: not ready, and why; the metrics say it too; what it holds in memory is visible.
    await eventually(lambda: _ready(daemon, False), timeout=20, what="/readyz not ready")
    _, body = await daemon.get("/readyz")
    readiness = json.loads(body)
    assert readiness["outbox"]["disk_full"] is True
    assert "full" in readiness["outbox"]["error"]
    assert await daemon.metric("relayd_outbox_disk_full") == 1
    assert await daemon.metric("relayd_outbox_errors_total") >= 1
    await eventually(
        lambda: _metric_is(daemon, "relayd_notifications_unstored", 20),
        what="the 20 unstored notifications shown",
    )
    assert (await daemon.status())["drives"]["d1"]["unstored"] == 20
    assert daemon.events("the disk under the outbox is full")

    # What is already on disk is still delivered while the disk stays full: handing a row to
    # the webhook and recording its answer are writes, which the reserve made room for.
    receiver.set_default("hook", ScriptedResponse(status=200))
    await wait_until(
        lambda: sorted(seqs(receiver.delivered("hook"))) == list(range(1, 31)),
        timeout=30,
        what="the 30 stored notifications delivered on a full disk",
    )
    await eventually(lambda: _delivered(state, 30), timeout=20, what="their rows marked delivered")
    assert not await _ready(daemon, True)

    # Room again: relayd notices by itself, stores what it held, and is ready again.
    disk.empty()
    await wait_until(
        lambda: sorted(seqs(receiver.delivered("hook"))) == list(range(1, 51)),
        timeout=30,
        what="all 50 delivered once the disk has room",
    )
    await eventually(lambda: _ready(daemon, True), timeout=20, what="/readyz ready again")
    assert await daemon.metric("relayd_outbox_disk_full") == 0
    assert await daemon.metric("relayd_notifications_unstored") == 0
    assert daemon.events("has room again")
    # The WAL was folded back and is kept small: it did not eat the room that came back.
    assert (state / "outbox.sqlite3-wal").stat().st_size <= RESERVE
    assert (state / "outbox.sqlite3.reserve").stat().st_size == RESERVE


async def test_the_wal_does_not_grow_past_its_limit_under_a_webhook_outage(
    disk: SmallDisk, daemon: Daemon, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    """With the webhook down and notifications flowing, every retry is a write: the WAL must be
    checkpointed by size, not only after thousands of rows, and cut back when it starts over."""
    state = disk.path / "state"
    receiver.set_default("hook", ScriptedResponse(status=503))
    await started(daemon, emulator)
    for _ in range(20):
        await emulator.emit("me", 100)
    await wait_until(lambda: sum(outbox_rows(state).values()) == 2000, what="2,000 stored")
    # RESERVE/2 is where the WAL is checkpointed; one group commit may go past it.
    assert (state / "outbox.sqlite3-wal").stat().st_size <= RESERVE
    assert await _ready(daemon, True)


async def test_sigterm_with_unstored_notifications_says_how_many_were_lost_and_exits_non_zero(
    disk: SmallDisk, daemon: Daemon, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    state = disk.path / "state"
    await started(daemon, emulator)
    await emulator.emit("me", 5)
    await wait_until(lambda: len(receiver.delivered("hook")) == 5, what="5 delivered")

    disk.fill()
    await emulator.emit("me", 12)
    await eventually(
        lambda: _metric_is(daemon, "relayd_notifications_unstored", 12),
        timeout=20,
        what="12 notifications held, unstored",
    )
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(timeout=30) == EXIT_LOST
    [lost] = daemon.events("could not be stored and are lost")
    assert lost["lost"] == 12
    [stopped] = daemon.events("stopped; notifications received from Graph were lost")
    assert stopped["lost"] == 12
    assert outbox_rows(state) == {"delivered": 5}  # nothing half-written


async def _metric_is(daemon: Daemon, name: str, expected: float) -> bool:
    return await daemon.metric(name) == expected


async def _delivered(state: Path, count: int) -> bool:
    return outbox_rows(state).get("delivered", 0) == count
