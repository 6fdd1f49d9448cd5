"""Heartbeats and leases against a real PostgreSQL server: what a user relies on is that a drive
has one holder at a time, that its epoch (the fencing token) changes with every holder, that a
released drive is free at once, and that a replica that stops renewing loses its drives after
`lease` and never before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from support.postgres import PostgresServer
from support.proxy import FreezableProxy

from relayd.cluster.coordinator import Coordinator, CoordinatorError
from relayd.store import open_store
from relayd.store.base import Fence

LEASE = 2.0


async def migrate(url: str, state_dir: Path) -> None:
    """The cluster's tables, as a relay starting on this database creates them."""
    async with open_store(url, state_dir, recover=False):
        pass


@pytest.fixture
async def replicas(
    postgres_url: str, tmp_path: Path
) -> AsyncIterator[Callable[[str], Coordinator]]:
    made: list[Coordinator] = []

    def make(name: str, lease: float = LEASE) -> Coordinator:
        coordinator = Coordinator(postgres_url, name, lease, info={"pid": 1})
        made.append(coordinator)
        return coordinator

    await migrate(postgres_url, tmp_path)
    yield make
    for coordinator in made:
        await coordinator.close()


async def test_a_lease_has_one_holder_until_it_is_released(
    replicas: Callable[[str], Coordinator],
) -> None:
    a, b = replicas("a"), replicas("b")
    taken = await a.acquire("drive:one")
    assert taken is not None
    fence, _sent = taken
    assert fence == Fence("drive:one", "a", 1)
    assert await b.acquire("drive:one") is None
    assert await a.acquire("drive:one") is None  # not even by the same name: see _ACQUIRE

    await a.release([fence])
    again = await b.acquire("drive:one")
    assert again is not None
    assert again[0] == Fence("drive:one", "b", 2)  # a new holder, a new epoch


async def test_renewal_keeps_a_lease_and_an_unrenewed_one_expires_after_lease(
    replicas: Callable[[str], Coordinator],
) -> None:
    a, b = replicas("a"), replicas("b")
    taken = await a.acquire("drive:one")
    assert taken is not None
    fence = taken[0]
    started = time.monotonic()
    # Renewed every third of the lease for two leases' time: b never gets it.
    while time.monotonic() - started < 2 * LEASE:
        beat = await a.beat([fence])
        assert beat.renewed == {fence}
        assert await b.acquire("drive:one") is None
        await asyncio.sleep(LEASE / 3)
    # a stops renewing: b gets it once the lease ran out, not before.
    stopped = time.monotonic()
    taken_by_b: tuple[Fence, float] | None = None
    while taken_by_b is None:
        taken_by_b = await b.acquire("drive:one")
        if taken_by_b is None:
            await asyncio.sleep(0.05)
    waited = time.monotonic() - stopped
    assert LEASE - LEASE / 3 - 0.2 <= waited <= LEASE + 1.0, waited
    assert taken_by_b[0].epoch == fence.epoch + 1
    # a's next heartbeat learns it lost the drive.
    assert (await a.beat([fence])).renewed == frozenset()


async def test_live_replicas_are_those_whose_heartbeat_has_not_expired(
    replicas: Callable[[str], Coordinator],
) -> None:
    a, b, c = replicas("a"), replicas("b"), replicas("c")
    await a.beat([])
    await b.beat([])
    assert (await c.beat([])).live == ("a", "b", "c")
    await b.leave()  # SIGTERM: gone from the ring at once
    assert (await c.beat([])).live == ("a", "c")
    views, _ = await c.view()
    assert {(row.name, row.alive) for row in views} == {("a", True), ("b", False), ("c", True)}


async def test_a_join_or_a_release_is_announced_to_the_others(
    replicas: Callable[[str], Coordinator], postgres_url: str
) -> None:
    woken = asyncio.Event()
    listener = Coordinator(postgres_url, "listener", LEASE, on_change=woken.set)
    try:
        await listener.beat([])  # connects, and listens
        other = replicas("other")
        await other.announce()
        await asyncio.wait_for(woken.wait(), 5)
        woken.clear()
        taken = await other.acquire("drive:x")
        assert taken is not None
        await other.release([taken[0]])
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await listener.close()


async def test_a_frozen_connection_fails_within_the_timeout_and_reconnects(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    await migrate(postgres_url, tmp_path)
    database = postgres_url.rsplit("/", 1)[1]
    async with FreezableProxy(postgres_server.port) as proxy:
        url = f"postgresql://relayd@127.0.0.1:{proxy.port}/{database}"
        coordinator = Coordinator(url, "a", LEASE)
        try:
            await coordinator.beat([])
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(CoordinatorError):
                await coordinator.beat([], timeout=0.5)
            assert time.monotonic() - started < 1.5
            proxy.thaw()
            await proxy.drop_all()
            assert (await coordinator.beat([])).live == ("a",)
        finally:
            await coordinator.close()


async def test_many_leases_are_taken_in_one_statement_except_those_held(
    replicas: Callable[[str], Coordinator],
) -> None:
    a, b = replicas("a"), replicas("b")
    held_by_a = await a.acquire("drive:3")
    assert held_by_a is not None
    taken, _sent = await b.acquire_many([f"drive:{i}" for i in range(6)])
    assert sorted(fence.resource for fence in taken) == [f"drive:{i}" for i in (0, 1, 2, 4, 5)]
    assert all(fence.holder == "b" and fence.epoch == 1 for fence in taken)
    assert (await b.beat(taken)).renewed == set(taken)
