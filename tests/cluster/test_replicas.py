"""Real `relayd run` replicas sharing drives through one PostgreSQL database.

What users notice: every drive has exactly one socket to Graph, whichever replicas run; a
replica killed with kill -9 has its drives connected elsewhere within the lease + 10 s with
every change made meanwhile delivered (changes mode); a fourth replica takes about a quarter
while no drive ever has two sockets; a replica cut off from PostgreSQL closes its sockets
before its lease ends and never writes after another replica took its drives.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.postgres import PostgresServer
from support.proxy import FreezableProxy
from support.waiting import eventually, wait_until

from relayd.cluster.ring import place
from relayd.emulator import GraphEmulator, WebhookReceiver

sys.path.insert(0, str(Path(__file__).parent))
from replicas import LEASE, Replicas, drives


@pytest.fixture
async def cluster(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, postgres_url: str
) -> AsyncIterator[Replicas]:
    made = Replicas(tmp_path, emulator, receiver, postgres_url, drives(30))
    try:
        yield made
    finally:
        await made.close()


def ring(replicas: str, count: int = 30) -> dict[str, str]:
    return {
        resource.partition(":")[2]: owner
        for resource, owner in place([f"drive:d{i:02d}" for i in range(count)], replicas).items()
    }


async def placed(cluster: Replicas, replicas: str) -> bool:
    """Each drive held by the replica the ring gives it, with one socket."""
    return cluster.all_connected_once() and await cluster.held() == ring(replicas)


@pytest.mark.timeout(90)
async def test_three_replicas_share_thirty_drives_with_one_socket_each_and_a_fourth_takes_a_quarter(
    cluster: Replicas,
) -> None:
    await cluster.start_all("abc")
    await eventually(lambda: placed(cluster, "abc"), timeout=30, what="three replicas placed")
    assert cluster.peak() == 1
    before = await cluster.held()
    assert set(before.values()) == {"a", "b", "c"}

    await cluster.start("d")
    await eventually(lambda: placed(cluster, "abcd"), timeout=30, what="four replicas placed")
    after = await cluster.held()
    moved = {drive for drive in after if after[drive] != before[drive]}
    assert moved == {drive for drive, owner in after.items() if owner == "d"}
    assert 3 <= len(moved) <= 13, moved  # about a quarter of 30
    assert cluster.peak() == 1  # never two sockets for one drive, even during the moves
    # Each replica's /status shows the whole cluster, and relayd status prints it.
    status = await cluster.daemons["a"].status()
    view = status["cluster"]
    assert {r["name"] for r in view["replicas"] if r["alive"]} == {"a", "b", "c", "d"}
    assert view["drives"] == after


@pytest.mark.timeout(90)
async def test_a_killed_replicas_drives_move_within_the_lease_and_no_change_is_lost(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, postgres_url: str
) -> None:
    cluster = Replicas(tmp_path, emulator, receiver, postgres_url, drives(12, mode="changes"))
    try:
        await cluster.start_all("abc")
        await eventually(
            lambda: placed_n(cluster, "abc", 12), timeout=30, what="three replicas placed"
        )
        victim_drives = [d for d, owner in (await cluster.held()).items() if owner == "c"]
        assert victim_drives
        cluster.daemons["c"].signal(signal.SIGKILL)
        await cluster.daemons["c"].wait()
        killed = time.monotonic()
        # Changes while nobody watches those drives: the new holder's catch-up finds them.
        changed: set[str] = set()
        for drive in victim_drives:
            changed |= set(await emulator.change(f"drives/{drive}", 2, notify=0))
        await eventually(lambda: placed_n(cluster, "ab", 12), timeout=LEASE + 10, what="failover")
        moved_after = time.monotonic() - killed
        assert moved_after <= LEASE + 10
        assert cluster.peak() == 1

        def delivered_ids() -> set[str]:
            ids = set()
            for request in receiver.delivered("hook"):
                body = request.json()
                if body["type"] == "drive.changes":
                    ids |= {item["id"] for item in body["data"]["items"]}
            return ids

        await wait_until(lambda: changed <= delivered_ids(), timeout=15, what="changes delivered")
    finally:
        await cluster.close()


async def placed_n(cluster: Replicas, replicas: str, count: int) -> bool:
    return cluster.all_connected_once() and await cluster.held() == ring(replicas, count)


@pytest.mark.timeout(90)
async def test_a_replica_cut_off_from_postgres_stops_before_its_lease_ends_and_never_writes_after(
    cluster: Replicas,
    postgres_server: PostgresServer,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
) -> None:
    database = cluster.url.rsplit("/", 1)[1]
    async with FreezableProxy(postgres_server.port) as proxy:
        await cluster.start_all("ab")
        await cluster.start("c", url=f"postgresql://relayd@127.0.0.1:{proxy.port}/{database}")
        await eventually(lambda: placed(cluster, "abc"), timeout=30, what="three placed")
        cut_off = [d for d, owner in (await cluster.held()).items() if owner == "c"]
        assert cut_off
        proxy.freeze()
        frozen = time.monotonic()
        # Notifications c receives now cannot be stored: they wait in its memory.
        for drive in cut_off:
            await emulator.emit(f"drives/{drive}")
        emitted = {drive: emulator.emitted[f"drives/{drive}"] for drive in cut_off}
        await wait_until(
            lambda: all(emulator.connected(f"drives/{d}") == 0 for d in cut_off),
            timeout=LEASE,
            what="c's sockets closed before its lease ends",
        )
        assert time.monotonic() - frozen < LEASE
        await eventually(lambda: placed(cluster, "ab"), timeout=LEASE + 10, what="taken over")
        assert cluster.peak() == 1
        # c reaches PostgreSQL again while its watchers still hold what they could not store:
        # the store refuses those writes (fenced), so nothing of c's reaches the receiver.
        proxy.thaw()
        await eventually(lambda: placed(cluster, "abc"), timeout=30, what="c back")
        for request in receiver.delivered("hook"):
            body = request.json()
            data = body["data"]
            if body["type"] == "drive.notification" and data.get("drive") in emitted:
                seq = data["notification"].get("relaydEmulatorSeq")
                assert seq != emitted[data["drive"]], f"c wrote {data['drive']} after take-over"
        assert cluster.peak() == 1
