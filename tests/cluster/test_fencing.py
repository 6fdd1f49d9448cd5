"""A relay that lost a drive's lease without noticing yet (paused, partitioned) writes nothing more
for it: the store refuses the write under the old epoch, the watcher stops at once (its socket
closes), and the delta cursor stays where the new holder found it. In-process relay, real
PostgreSQL, the emulator; the take-over is made in the database as another replica's would be.
And a relay whose database goes away for longer than the lease stops its drive before the lease
ends, then takes it again (a new epoch) once the database is back."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from conftest import Relay, StartRelay, of_type
from support.postgres import PostgresServer
from support.waiting import eventually, wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver

# Long, so that the relay's own heartbeat (every lease / 3) cannot be what notices the loss:
# what stops the watcher here is the fenced write alone.
LEASE = "60s"


@pytest.mark.timeout(60)
async def test_a_write_under_a_lost_lease_is_refused_and_stops_the_watcher(
    start_relay: StartRelay,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    postgres_url: str,
) -> None:
    drive = {
        "name": "d1",
        "account": "test",
        "resource": "drives/one",
        "webhook": "hook",
        "mode": "changes",
        "changes": {"quiet_period": 0, "follow_up": 0, "poll_interval": 0},
    }
    relay = await start_relay(
        drives=[drive],
        store={"url": postgres_url},
        cluster={"replica": "a", "lease": LEASE},
    )
    await wait_until(lambda: "d1" in relay.supervisor.watchers, timeout=10, what="d1 taken")
    await relay.connected("d1")
    await emulator.change("drives/one", 1)
    await receiver.wait_for(1)  # under its own lease, the relay delivers

    db = await asyncpg.connect(postgres_url)
    try:
        cursor = await db.fetchval("SELECT cursor FROM drives WHERE name = 'd1'")
        # Another replica takes the drive over (as after a's lease ran out while a was paused).
        await db.execute(
            "UPDATE leases SET holder = 'b', epoch = epoch + 1, acquired = clock_timestamp(),"
            " expires = clock_timestamp() + interval '1 hour' WHERE resource = 'drive:d1'"
        )
        await emulator.change("drives/one", 1)
        await wait_until(
            lambda: emulator.connected("drives/one") == 0, timeout=10, what="a's socket closed"
        )
        await wait_until(lambda: "d1" not in relay.supervisor.watchers, timeout=10, what="dropped")

        async def cursor_is_unchanged() -> bool:
            return await db.fetchval("SELECT cursor FROM drives WHERE name = 'd1'") == cursor

        await eventually(cursor_is_unchanged, timeout=2, what="cursor where b found it")
    finally:
        await db.close()
    assert len(of_type(receiver.delivered("hook"), "drive.changes")) == 1
    assert relay.supervisor.cluster is not None
    assert "drive:d1" not in relay.supervisor.cluster.held


async def start_alone(start_relay: StartRelay, server: PostgresServer, *, lease: str) -> Relay:
    """Replica a alone on a database of `server` (which the test stops), d1 held and connected."""
    relay = await start_relay(
        store={"url": server.create_database()}, cluster={"replica": "a", "lease": lease}
    )
    await wait_until(lambda: "d1" in relay.supervisor.watchers, timeout=10, what="d1 taken")
    await relay.connected("d1")
    return relay


@pytest.mark.timeout(90)
async def test_postgres_down_for_longer_than_the_lease_stops_the_drive_and_it_comes_back(
    start_relay: StartRelay,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    own_postgres_server: PostgresServer,
) -> None:
    relay = await start_alone(start_relay, own_postgres_server, lease="3s")
    await asyncio.to_thread(own_postgres_server.stop)
    stopped = time.monotonic()
    # Without the database no lease can be renewed: the socket closes before the lease ends.
    await wait_until(lambda: emulator.connected("me") == 0, timeout=3, what="socket closed")
    assert time.monotonic() - stopped < 3
    member = relay.supervisor.cluster
    assert member is not None and member.renew_failures >= 1 and not member.held
    await asyncio.to_thread(own_postgres_server.start)
    # Back: the lease is taken again (a new epoch), the drive reconnects and says it may have
    # missed changes meanwhile.
    await wait_until(lambda: emulator.connected("me") == 1, timeout=20, what="reconnected")
    await wait_until(
        lambda: of_type(receiver.delivered("hook"), "drive.resync"), timeout=10, what="resync"
    )
    fence = member.fence("drive:d1")
    assert fence is not None and fence.epoch >= 2


@pytest.mark.timeout(60)
async def test_a_relay_stopped_while_its_guard_stops_a_drive_stops_cleanly(
    start_relay: StartRelay,
    emulator: GraphEmulator,
    own_postgres_server: PostgresServer,
) -> None:
    # Seen in CI: SIGTERM arrived while the guard (placement's own task) was stopping a drive
    # that was slow to stop. Shutdown cancels placement, and the half-done stop left the drive's
    # watcher without its task: the daemon's stop then failed on it, and the daemon crashed.
    relay = await start_alone(start_relay, own_postgres_server, lease="5s")
    member = relay.supervisor.cluster
    assert member is not None
    await asyncio.to_thread(own_postgres_server.stop)
    # A notification that cannot be stored: the watcher's stop waits to write it out.
    await emulator.emit("me")
    await wait_until(lambda: len(relay.watcher("d1").inbox) == 1, timeout=5, what="held")
    # The guard has let go of the lease and is stopping the drive, which has not stopped yet.
    await wait_until(
        lambda: not member.held and "d1" in relay.supervisor.watchers,
        timeout=10,
        what="the guard stopping d1",
    )
    await relay.stop()  # raises what ended the daemon, if anything did
    assert emulator.connected("me") == 0
    # The notification that could not be stored is said to be lost, not silently dropped.
    assert relay.supervisor.lost == 1
