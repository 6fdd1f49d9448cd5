"""Real `relayd run` replicas sharing drives through one PostgreSQL database.

What users notice: every drive has exactly one socket to Graph, whichever replicas run; a
replica killed with kill -9 has its drives connected elsewhere within the lease + 10 s with
every change made meanwhile delivered (changes mode); a fourth replica takes about a quarter
while no drive ever has two sockets; a replica cut off from PostgreSQL closes its sockets
before its lease ends and never writes after another replica took its drives.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from replicas import LEASE, Replicas, drives
from support.configs import FAST_RETRY
from support.postgres import PostgresServer
from support.proxy import FreezableProxy
from support.waiting import eventually, wait_until

from relayd.cluster.ring import place
from relayd.emulator import GraphEmulator, WebhookReceiver


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

    # The emulator counts a socket as soon as it accepts it; d's own view of its drives (and so
    # its readiness) follows once each has read the handshake's answer.
    async def d_is_ready() -> bool:
        return (await cluster.daemons["d"].get("/readyz"))[0] == 200

    await eventually(d_is_ready, timeout=10, what="d ready: all its drives connected")
    _, text = await cluster.daemons["d"].get("/readyz")
    assert json.loads(text)["cluster"] == {"replica": "d", "healthy": True}
    # relayd status, as an operator runs it beside replica a.
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "--config", str(cluster.daemons["a"].config), "status",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(done.communicate(), 30)
    screen = out.decode()
    assert "cluster: this is replica a, lease 4s" in screen, err.decode()
    replica_rows = [
        line.split() for line in screen.splitlines() if line[:2] in {"a ", "b ", "c ", "d "}
    ]
    assert {row[0] for row in replica_rows} == {"a", "b", "c", "d"}
    held_by = dict(
        line.split()
        for line in screen.splitlines()
        if line.startswith("d") and len(line.split()) == 2
    )
    assert held_by == after


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


@pytest.mark.timeout(90)
async def test_sigterm_hands_the_drives_over_at_once_and_the_password_is_never_shown(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, postgres_url: str
) -> None:
    # The test server trusts loopback, so any password works: this one must never be shown.
    secret = "hunter2-db-secret"
    url = postgres_url.replace("postgresql://relayd@", f"postgresql://relayd:{secret}@")
    cluster = Replicas(tmp_path, emulator, receiver, url, drives(30))
    try:
        await cluster.start_all("ab")
        await eventually(lambda: placed(cluster, "ab"), timeout=30, what="two placed")
        _, status_text = await cluster.daemons["b"].get("/status")
        started = time.monotonic()
        cluster.daemons["b"].signal(signal.SIGTERM)
        assert await cluster.daemons["b"].wait() == 0
        await eventually(lambda: placed(cluster, "a"), timeout=LEASE, what="hand-over")
        # Released at the stop, not expired: sooner than any of b's leases could have run out
        # (its last renewal was at most lease / 3 before the SIGTERM).
        assert time.monotonic() - started < LEASE - LEASE / 3
        assert cluster.peak() == 1
        _, a_status = await cluster.daemons["a"].get("/status")
        for text in (status_text, a_status, *(d.log.read_text() for d in cluster.daemons.values())):
            assert secret not in text
            assert "joining the cluster" not in text or "relayd@127.0.0.1" in text
    finally:
        await cluster.close()


@pytest.mark.timeout(90)
async def test_an_ordered_webhook_is_delivered_by_one_replica_at_a_time_in_order(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, postgres_url: str
) -> None:
    hooks = {"hook": {"url": receiver.url("hook"), "ordered": True, "retry": FAST_RETRY}}
    cluster = Replicas(tmp_path, emulator, receiver, postgres_url, drives(4), webhooks=hooks)
    try:
        await cluster.start_all("ab")

        async def runs_hook() -> set[str]:
            return {
                name
                for name, daemon in cluster.daemons.items()
                if daemon.process is not None
                and daemon.process.returncode is None
                and "hook" in (await daemon.status()).get("webhooks", {})
            }

        async def one_runs_it() -> bool:
            return await placed_n(cluster, "ab", 4) and len(await runs_hook()) == 1

        await eventually(one_runs_it, timeout=30, what="one replica runs the ordered webhook")
        (holder,) = await runs_hook()
        # The drive on the other replica: its rows are written there, delivered by the holder.
        other = next(d for d, owner in (await cluster.held()).items() if owner != holder)
        await emulator.emit(f"drives/{other}", 20)
        await receiver.wait_for(20, timeout=15)
        cluster.daemons[holder].signal(signal.SIGTERM)
        assert await cluster.daemons[holder].wait() == 0
        survivor = "b" if holder == "a" else "a"
        await eventually(
            lambda: runs_hook_is(runs_hook, {survivor}), timeout=LEASE + 5, what="taken over"
        )
        await eventually(lambda: placed_n(cluster, survivor, 4), timeout=LEASE + 5, what="drives")
        await emulator.emit(f"drives/{other}", 10)

        def seqs() -> list[int]:
            return [
                r.json()["data"]["notification"]["relaydEmulatorSeq"]
                for r in receiver.delivered("hook")
                if r.json()["type"] == "drive.notification"
            ]

        # The drives that moved send drive.resync too; the notifications arrive in order.
        await wait_until(lambda: len(seqs()) >= 30, timeout=15, what="all 30 delivered")
        assert seqs() == list(range(1, 31))
    finally:
        await cluster.close()


async def runs_hook_is(runs_hook: Callable[[], Awaitable[set[str]]], expected: set[str]) -> bool:
    return await runs_hook() == expected
