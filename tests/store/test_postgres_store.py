"""What the PostgreSQL store adds to the shared behaviour: replicas on one database.

Migrations raced by replicas starting at once, fences, claims across replicas with a visibility
deadline, LISTEN/NOTIFY wake-ups, and a server that goes away and comes back. A real server
(tests/support/postgres.py), a database per test.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator

import asyncpg
import pytest
from store_rows import T0, Clock, new, result
from support.postgres import PostgresServer
from support.proxy import FreezableProxy
from support.waiting import eventually, wait_until

import relayd.store.postgres as postgres
from relayd.store import Delivery, Fence, Fenced, Filter, OutboxError, State
from relayd.store.postgres import PostgresStore


class Recorder:
    """A router that takes no rows itself and remembers which webhooks it was woken for."""

    def __init__(self) -> None:
        self.woken: list[str] = []

    def reserve(self, webhook: str, count: int) -> None:
        return None

    def wake(self, webhook: str) -> None:
        self.woken.append(webhook)


async def fetch(url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    connection = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await connection.fetch(sql, *params)]
    finally:
        await connection.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(postgres_url: str, clock: Clock) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_url, replica="r1", clock=clock) as opened:
        yield opened


# -- schema ---------------------------------------------------------------------------------------


async def test_replicas_opening_a_new_database_at_once_migrate_it_once(postgres_url: str) -> None:
    stores = [PostgresStore(postgres_url, replica=f"r{n}", clock=Clock()) for n in range(4)]
    opened = await asyncio.gather(*(store.__aenter__() for store in stores), return_exceptions=True)
    try:
        assert not [failure for failure in opened if isinstance(failure, BaseException)]
        await stores[0].add([new(1)])
        assert [row.message_id for row in await stores[3].claim("hook", 10)] == ["msg_hook_d1_1"]
    finally:
        for store in stores:
            await store.close()
    versions = await fetch(postgres_url, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(number,) for number, _ in postgres.MIGRATIONS]
    tables = await fetch(
        postgres_url,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " ORDER BY table_name",
    )
    assert [name for (name,) in tables] == [
        "attempts",
        "deliveries",
        "drives",
        "leases",
        "replicas",
        "schema_version",
    ]


async def test_a_database_of_a_newer_relayd_is_refused_and_left_untouched(
    postgres_url: str,
) -> None:
    async with PostgresStore(postgres_url):
        pass
    await fetch(postgres_url, "INSERT INTO schema_version VALUES (99)")

    with pytest.raises(OutboxError, match="newer relayd") as raised:
        async with PostgresStore(postgres_url):
            pass

    assert "schema 99" in str(raised.value)
    assert postgres.safe_url(postgres_url) in str(raised.value)
    versions = await fetch(postgres_url, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(1,), (99,)]


# -- fences ---------------------------------------------------------------------------------------


async def hold(url: str, resource: str, holder: str, epoch: int, *, seconds: float = 60) -> None:
    """Write the lease row as the cluster does (the database's clock)."""
    await fetch(
        url,
        "INSERT INTO leases (resource, holder, epoch, acquired, expires)"
        " VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp() + make_interval(secs => $4))"
        " ON CONFLICT (resource) DO UPDATE SET holder = excluded.holder, epoch = excluded.epoch,"
        " acquired = excluded.acquired, expires = excluded.expires",
        resource,
        holder,
        epoch,
        float(seconds),
    )


async def test_a_write_under_a_stale_fence_raises_fenced_and_writes_nothing(
    store: PostgresStore, postgres_url: str
) -> None:
    await hold(postgres_url, "drive:d1", "r1", 1)
    mine = Fence("drive:d1", "r1", 1)
    await store.save_drive_state("d1", "me", "cursor-1", [new(1)], fence=mine)
    await store.add([new(2)], fence=mine)

    # Another replica takes the drive over: epoch 2 is its own.
    await hold(postgres_url, "drive:d1", "r2", 2)
    with pytest.raises(Fenced, match="drive:d1"):
        await store.add([new(3)], fence=mine)
    with pytest.raises(Fenced):
        await store.save_drive_state("d1", "me", "cursor-2", [new(4)], fence=mine)
    # A fenced write fails alone: what shares its commit is written.
    outcomes = await asyncio.gather(
        store.add([new(5)], fence=mine), store.add([new(6)]), return_exceptions=True
    )
    assert isinstance(outcomes[0], Fenced)
    assert outcomes[1] is None

    assert await store.drive_state("d1") == ("me", "cursor-1")
    stored = await fetch(postgres_url, "SELECT message_id FROM deliveries ORDER BY id")
    assert [m for (m,) in stored] == ["msg_hook_d1_1", "msg_hook_d1_2", "msg_hook_d1_6"]
    assert store.healthy  # a fence that does not hold says nothing of the store


async def test_a_lease_that_expired_fences_its_own_holder(
    store: PostgresStore, postgres_url: str
) -> None:
    await hold(postgres_url, "drive:d1", "r1", 7, seconds=-1)
    with pytest.raises(Fenced):
        await store.save_drive_state("d1", "me", "cursor", fence=Fence("drive:d1", "r1", 7))
    assert await store.drive_state("d1") is None


# -- replicas sharing the queue ------------------------------------------------------------------


async def test_rows_added_by_one_replica_wake_the_other_replicas_dispatchers(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "WAKE_EVERY", 3600.0)  # only a NOTIFY can explain a wake-up
    router = Recorder()
    async with (
        PostgresStore(postgres_url, replica="a", clock=Clock()) as a,
        PostgresStore(postgres_url, replica="b", router=router, clock=Clock()) as b,
    ):
        await wait_until(lambda: b._own_pids and len(b._own_pids) >= 2, what="b listening")
        started = time.monotonic()
        await a.add([new(1), new(2, webhook="other")])
        await wait_until(lambda: {"hook", "other"} <= set(router.woken), what="b woken")
        assert time.monotonic() - started < 2
        [row] = await b.claim("hook", 10)
        assert row.message_id == "msg_hook_d1_1"

        # `relayd outbox replay` from anywhere wakes them too.
        await b.record([result(row, State.DEAD, status=400)])
        router.woken.clear()
        assert await a.replay(Filter(webhook="hook")) == 1
        await wait_until(lambda: "hook" in router.woken, what="b woken by the replay")


async def test_rows_in_flight_stay_their_replicas_until_it_stops_renewing_them(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "VISIBILITY", 1.0)
    monkeypatch.setattr(postgres, "VISIBILITY_RENEW", 0.2)
    a = PostgresStore(postgres_url, replica="a", router=Recorder(), clock=Clock())
    async with PostgresStore(postgres_url, replica="b", router=Recorder(), clock=Clock()) as b:
        async with a:
            await a.add([new(n) for n in range(3)])
            taken = await a.claim("hook", 2)
            # Alive, a renews its rows: b never gets them, well past the first deadline.
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                assert [row.message_id for row in await b.claim("hook", 10)] in (
                    [],
                    ["msg_hook_d1_2"],
                )
                await asyncio.sleep(0.1)
        # a is gone without a word about its two attempts (killed mid-POST): once their
        # deadline passes they are b's, with the same webhook-id.
        again: list[Delivery] = []

        async def b_has_them() -> bool:
            again.extend(await b.claim("hook", 10))
            return len(again) == 2

        await eventually(b_has_them, what="a's rows claimed by b", timeout=10)
        assert sorted(row.message_id for row in again) == sorted(r.message_id for r in taken)


async def test_recover_puts_back_only_this_replicas_own_rows(
    postgres_url: str, clock: Clock
) -> None:
    async with PostgresStore(postgres_url, replica="a", clock=clock) as a:
        await a.add([new(1), new(2)])
        [mine] = await a.claim("hook", 1)
        async with PostgresStore(postgres_url, replica="b", clock=clock) as b:
            [theirs] = await b.claim("hook", 1)
        # b restarts under the same name: its row comes back; a's is still a's.
        async with PostgresStore(postgres_url, replica="b", clock=clock) as b:
            states = dict(await fetch(postgres_url, "SELECT message_id, state FROM deliveries"))
            assert states == {mine.message_id: "inflight", theirs.message_id: "pending"}
            [back] = await b.claim("hook", 10)
            assert back.message_id == theirs.message_id


async def test_rows_written_again_after_a_lost_commit_are_one_row(store: PostgresStore) -> None:
    # What a caller does when the connection died with its commit's outcome unknown.
    await store.add([new(1), new(2)])
    await store.add([new(2), new(3)])
    summary = await store.summary()
    assert summary.counts == {("hook", State.PENDING): 3}


# -- the server unreachable -----------------------------------------------------------------------


def through(proxy: FreezableProxy, url: str, password: str) -> str:
    """`url` by way of the proxy, with a password (the test server trusts: it is ignored)."""
    parts = urllib.parse.urlsplit(url)
    netloc = f"{parts.username}:{password}@{proxy.host}:{proxy.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def test_a_server_gone_fails_commits_naming_it_and_the_store_reconnects_losing_nothing(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "VISIBILITY_RENEW", 0.2)  # the keeper notices an idle outage
    password = "pw-never-shown-4711"
    async with FreezableProxy(postgres_server.port) as proxy:
        url = through(proxy, postgres_url, password)
        async with PostgresStore(url, replica="r1", router=Recorder()) as store:
            assert password not in store.describe()
            await store.add([new(1)])

            await proxy.stop()  # refused, and every connection reset
            with pytest.raises(OutboxError) as raised:
                await store.add([new(2)])
            database = urllib.parse.urlsplit(postgres_url).path
            assert f"127.0.0.1:{proxy.port}{database}" in str(raised.value)
            assert password not in str(raised.value)
            await wait_until(lambda: not store.healthy, what="the store unhealthy")
            assert store.last_error is not None and password not in store.last_error

            await proxy.start()

            async def stored_again() -> bool:
                try:
                    await store.add([new(2)])
                except OutboxError:
                    return False
                return True

            await eventually(stored_again, what="a commit once the server is back")
            assert store.healthy
            assert store.reconnects >= 1
            assert (await store.summary()).counts == {("hook", State.PENDING): 2}


async def test_a_server_down_at_start_is_refused_naming_it_without_the_password(
    postgres_url: str,
) -> None:
    async with FreezableProxy(1) as proxy:  # forwards to a port where nothing listens
        url = through(proxy, postgres_url, "pw-secret-at-start")
        with pytest.raises(OutboxError, match="cannot connect") as raised:
            async with PostgresStore(url):
                pass
    assert f"127.0.0.1:{proxy.port}" in str(raised.value)
    assert "pw-secret-at-start" not in str(raised.value)


def test_safe_url_drops_the_password_and_the_query() -> None:
    assert (
        postgres.safe_url("postgresql://relayd:s3cret@db.internal:5432/relayd?sslmode=require")
        == "postgresql://relayd@db.internal:5432/relayd"
    )
    assert postgres.safe_url("postgresql://db/relayd") == "postgresql://db/relayd"


def test_placeholders_are_numbered_for_postgresql() -> None:
    where, params = Filter(webhook="a", drive="d", since=T0).where()
    assert postgres.numbered(where) == "webhook = $1 AND drive = $2 AND created >= $3"
    assert params == ["a", "d", T0]
