"""Delivery across config reloads, on the real daemon: `relayd run` in a subprocess, SIGHUPs.

A reload that changes a webhook (a secret rotation is enough) replaces its dispatcher while the
drives keep committing new notifications, some of them reserved for the dispatcher being replaced.
Not one of them may be left behind.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import of_type, seqs
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from support.configs import FAST_RETRY, relay_document
from support.delivery_helpers import new_secret
from support.waiting import wait_until
from test_cli import RelayProcess

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ReceivedRequest

RATE = 200  # notifications per second from the emulator
RELOADS = 50


def hook_document(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, secret: str
) -> dict[str, Any]:
    """The daemon's config with the webhook signing with `secret`."""
    hook = {"url": receiver.url("hook"), "secret": secret, "retry": FAST_RETRY}
    return relay_document(
        tmp_path,
        emulator,
        receiver,
        webhooks={"hook": hook},
        log={"level": "info", "format": "json"},
    )


def stranded_rows(state_dir: Path) -> list[tuple[str, int]]:
    """Rows nobody will deliver before the next restart: in flight, or never tried at all."""
    with sqlite3.connect(f"file:{state_dir / 'outbox.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute(
            "SELECT state, attempts FROM deliveries WHERE state = 'inflight'"
            " OR (state = 'pending' AND attempts = 0)"
        ).fetchall()


def verifies(request: ReceivedRequest, secrets: list[str]) -> bool:
    for secret in secrets:
        try:
            Webhook(secret).verify(request.body, dict(request.headers))
        except WebhookVerificationError:
            continue
        return True
    return False


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    process = RelayProcess(tmp_path / "config.yaml")
    yield process
    await process.stop()


async def emit_steadily(emulator: GraphEmulator, stop: asyncio.Event) -> None:
    """RATE notifications a second, paced by the clock (a load, not a synchronisation)."""
    started = time.monotonic()
    sent = 0
    while not stop.is_set():
        due = started + sent / RATE
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        await emulator.emit("me")
        sent += 1


@pytest.mark.timeout(240)
async def test_fifty_secret_rotations_under_load_deliver_every_notification_and_strand_none(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, relay: RelayProcess
) -> None:
    secrets = [new_secret()]
    relay.config.write_text(yaml.safe_dump(hook_document(tmp_path, emulator, receiver, secrets[0])))
    await relay.start()
    await wait_until(lambda: emulator.connected("me") == 1, timeout=30, what="relay connected")

    stop = asyncio.Event()
    emitting = asyncio.create_task(emit_steadily(emulator, stop))
    try:
        for reload in range(1, RELOADS + 1):
            secrets.append(new_secret())
            document = hook_document(tmp_path, emulator, receiver, secrets[-1])
            relay.config.write_text(yaml.safe_dump(document))
            relay.signal(1)  # SIGHUP
            await wait_until(
                lambda n=reload: len(relay.events("config reloaded")) >= n,
                timeout=30,
                what=f"reload {reload} applied",
            )
            # Notifications flow between two reloads, as they would in a real deployment.
            emitted = emulator.emitted.get("me", 0)
            await wait_until(
                lambda e=emitted: emulator.emitted.get("me", 0) >= e + RATE // 20,
                what="notifications emitted since the reload",
            )
    finally:
        stop.set()
        await emitting
    sent = emulator.emitted["me"]
    assert sent >= RELOADS * RATE // 20  # the reloads really ran under load

    def all_delivered() -> bool:
        return set(seqs(receiver.delivered("hook"))) == set(range(1, sent + 1))

    try:
        await wait_until(all_delivered, timeout=60, what=f"all {sent} notifications delivered")
    finally:
        missing = set(range(1, sent + 1)) - set(seqs(receiver.delivered("hook")))
        print(f"{len(missing)} of {sent} never delivered: {sorted(missing)[:40]}")
    assert all(verifies(r, secrets) for r in of_type(receiver.delivered("hook")))

    relay.signal(15)  # SIGTERM
    assert await relay.wait(timeout=30) == 0
    assert stranded_rows(tmp_path / "state") == []
