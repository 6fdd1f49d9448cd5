"""A whole relay on PostgreSQL through a server crash: what was received is delivered, all of it.

The real supervisor in-process, the Graph emulator pushing a burst, the server of this test alone
(`own_postgres_server`) restarted in immediate mode (a crash: no shutdown checkpoint) halfway.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import StartRelay, relay_config, seqs
from support.postgres import PostgresServer
from support.waiting import wait_until

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
