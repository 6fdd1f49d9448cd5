"""A whole relay on PostgreSQL through a server crash or an outage: what was received is delivered.

The real supervisor in-process, the Graph emulator pushing a burst, the server of this test alone
(`own_postgres_server`) restarted in immediate mode (a crash: no shutdown checkpoint) halfway.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import StartRelay, relay_config, seqs
from support.daemon import free_port
from support.postgres import PostgresServer
from support.proxy import FreezableProxy
from support.waiting import eventually, wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver

BURST = 600
CHUNK = 20


@pytest.mark.timeout(150)
async def test_postgres_restarted_mid_burst_loses_no_notification(
    tmp_path: Path,
    own_postgres_server: PostgresServer,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
) -> None:
    url = own_postgres_server.create_database()
    relay = await start_relay(relay_config(tmp_path, emulator, receiver, store={"url": url}))
    store = relay.supervisor.outbox
    assert store is not None and store.kind == "postgresql"
    await wait_until(lambda: emulator.connected("me") == 1, what="relay connected")

    async def burst() -> None:
        for _ in range(BURST // CHUNK):
            await emulator.emit("me", CHUNK)
            await asyncio.sleep(0.01)  # a stream, so that part of it arrives during the crash

    emitting = asyncio.create_task(burst())
    await wait_until(lambda: len(receiver.delivered("hook")) >= 100, what="the burst under way")
    # In a thread: pg_ctl waits for the server, the relay's loop goes on meanwhile.
    await asyncio.to_thread(own_postgres_server.restart, immediate=True)
    await emitting

    await wait_until(
        lambda: len(set(seqs(receiver.delivered("hook")))) == BURST,
        timeout=90,
        what="every notification of the burst delivered",
    )
    delivered = seqs(receiver.delivered("hook"))
    assert sorted(set(delivered)) == list(range(1, BURST + 1))
    # The crash was seen: commits failed meanwhile, and the store is healthy again.
    assert store.failures >= 1
    await wait_until(lambda: store.healthy, what="the store healthy again")
    assert relay.supervisor.lost == 0
    assert not relay.task.done()
    # Copies of a notification (a "delivered" mark lost in the crash) keep their webhook-id.
    ids: dict[int, set[str]] = {}
    for request in receiver.delivered("hook"):
        seq = json.loads(request.body)["data"]["notification"]["relaydEmulatorSeq"]
        ids.setdefault(seq, set()).add(request.headers["webhook-id"])
    assert all(len(names) == 1 for names in ids.values())


@pytest.mark.timeout(90)
async def test_readiness_says_while_postgresql_is_away_and_the_relay_catches_up_after(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_url: str,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    http: aiohttp.ClientSession,
) -> None:
    password = "pw-never-in-readyz-5150"
    port = free_port()
    async with FreezableProxy(postgres_server.port) as proxy:
        parts = urllib.parse.urlsplit(postgres_url)
        url = urllib.parse.urlunsplit(
            parts._replace(netloc=f"{parts.username}:{password}@127.0.0.1:{proxy.port}")
        )
        config = relay_config(
            tmp_path,
            emulator,
            receiver,
            store={"url": url},
            admin={"listen": f"127.0.0.1:{port}"},
        )
        relay = await start_relay(config)
        await relay.connected()

        async def readyz() -> tuple[int, dict[str, Any]]:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                return response.status, await response.json()

        async def answers(status: int) -> bool:
            return (await readyz())[0] == status

        await eventually(lambda: answers(200), what="ready")
        await proxy.stop()  # the server unreachable: refused, connections reset
        await emulator.emit("me", 3)  # arrives meanwhile: held by the watcher, not lost

        await eventually(lambda: answers(503), what="not ready while the store is away")
        _, body = await readyz()
        assert body["outbox"]["ok"] is False
        assert f"127.0.0.1:{proxy.port}" in body["outbox"]["error"]
        assert password not in json.dumps(body)

        await proxy.start()
        await eventually(lambda: answers(200), what="ready again", timeout=20)
        await wait_until(
            lambda: sorted(set(seqs(receiver.delivered("hook")))) == [1, 2, 3],
            timeout=20,
            what="what arrived meanwhile delivered",
        )
