"""Fixtures shared by the suite: the Graph emulator, a webhook receiver, and a relay in-process.

Everything listens on 127.0.0.1; the relay runs the real supervisor with a real SQLite outbox in
the test's own temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/support, for every test folder

from support.configs import TOKEN, relay_document
from support.waiting import wait_until

from relayd import logs
from relayd.config import Config, parse_config
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.supervisor import Supervisor
from relayd.watcher import DriveState, DriveWatcher

# Fixtures kept in support modules, for every test: a test CA and the emulator over TLS, a real
# PostgreSQL server, and both store backends for one suite.
pytest_plugins = ["support.tls", "support.postgres", "support.stores"]


@pytest.fixture(autouse=True)
def _logging() -> None:
    # Console lines to whatever stderr pytest has at the moment: shown on failure only.
    logs.configure("debug", "console")


@pytest.fixture
async def emulator() -> AsyncIterator[GraphEmulator]:
    async with GraphEmulator(tokens=[TOKEN]) as graph:
        yield graph


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for tests that talk HTTP themselves."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as hooks:
        yield hooks


class Relay:
    """A running supervisor and what a test needs to poke at it."""

    def __init__(self, supervisor: Supervisor, shutdown: asyncio.Event, task: asyncio.Task[None]):
        self.supervisor = supervisor
        self.shutdown = shutdown
        self.task = task

    def watcher(self, drive: str = "d1") -> DriveWatcher:
        return self.supervisor.watchers[drive]

    async def connected(self, drive: str = "d1", timeout: float = 10.0) -> None:
        """Wait until the drive's watcher itself is CONNECTED.

        The emulator counts a client as connected before the client has read the
        server's handshake answer; a test that then cuts the line must wait for this.
        """
        await wait_until(
            lambda: self.watcher(drive).status.state is DriveState.CONNECTED,
            timeout=timeout,
            what=f"{drive} connected",
        )

    async def stop(self, timeout: float = 15.0) -> None:
        self.shutdown.set()
        await asyncio.wait_for(asyncio.shield(self.task), timeout)


def relay_config(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    *,
    drives: list[dict[str, Any]] | None = None,
    webhooks: dict[str, dict[str, Any]] | None = None,
    **top: Any,
) -> Config:
    """A config for the emulator and receiver; fast retries unless a test says otherwise."""
    document = relay_document(tmp_path, emulator, receiver, drives=drives, webhooks=webhooks, **top)
    return parse_config(
        yaml.safe_dump(document), filename="test-config.yaml", env={}, base_dir=tmp_path
    )


StartRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> AsyncIterator[StartRelay]:
    """`relay = await start_relay(drives=..., webhooks=...)`; stopped at the end of the test."""
    running: list[Relay] = []

    async def start(config: Config | None = None, **options: Any) -> Relay:
        config = config or relay_config(tmp_path, emulator, receiver, **options)
        supervisor = Supervisor(config)
        shutdown = asyncio.Event()
        task = asyncio.create_task(supervisor.run(shutdown))
        started = asyncio.create_task(supervisor.started.wait())
        done, _ = await asyncio.wait({task, started}, timeout=10, return_when="FIRST_COMPLETED")
        if task in done:
            started.cancel()
            task.result()  # raises what stopped it
        if started not in done:
            raise AssertionError("relay did not start within 10 s")
        relay = Relay(supervisor, shutdown, task)
        running.append(relay)
        return relay

    yield start
    for relay in running:
        if not relay.task.done():
            await relay.stop()


def of_type(requests: list[Any], event_type: str = "drive.notification") -> list[Any]:
    """The requests whose body is an event of the given type."""
    return [r for r in requests if json.loads(r.body)["type"] == event_type]


def seqs(requests: list[Any]) -> list[int]:
    """The emulator's sequence numbers of delivered notifications, in arrival order; other
    events (drive.resync after a reconnect) are left out."""
    return [
        json.loads(r.body)["data"]["notification"]["relaydEmulatorSeq"] for r in of_type(requests)
    ]


async def wait_notifications(
    receiver: WebhookReceiver, count: int, *, name: str = "hook", timeout: float = 10.0
) -> list[Any]:
    """Wait until `count` drive.notification events were delivered to `name`; return them."""
    await wait_until(
        lambda: len(of_type(receiver.delivered(name))) >= count,
        timeout=timeout,
        what=f"{count} notifications delivered to {name}",
    )
    return of_type(receiver.delivered(name))
