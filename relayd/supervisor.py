"""The supervisor: builds the pipeline from a config and owns every task in it.

config -> supervisor -> one watcher per drive -> outbox -> one dispatcher per webhook.

It opens the outbox, starts a dispatcher per webhook and a watcher per drive in one TaskGroup,
and on shutdown takes them down in the order that loses nothing: watchers first (no new
notifications; what arrived is written out), then dispatchers (attempts under way get a grace
period), then the outbox (what is queued is committed).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import structlog

from relayd.auth import AuthError, CommandTokenProvider, FileTokenProvider, TokenProvider
from relayd.config import AccountConfig, Config
from relayd.delivery import Dispatcher
from relayd.graph import GraphClient
from relayd.outbox import Outbox
from relayd.watcher import DriveWatcher

log = structlog.get_logger("relayd.supervisor")

OUTBOX_FILE = "outbox.sqlite3"
LOCK_FILE = "relayd.lock"
WATCHER_STOP_TIMEOUT = 10.0  # watchers only close sockets and flush their queue to disk
DRIVE_RESTART_DELAY = 10.0  # after a watcher crashed on something unexpected
PRUNE_INTERVAL = 3600.0


class StartupError(Exception):
    """relayd cannot start (state_dir locked or unusable, outbox unreadable). Safe to print."""


class NotSignedIn:
    """Token source of an MSAL account before `relayd login` has stored a sign-in."""

    def __init__(self, account: str) -> None:
        self.account = account

    async def token(self, refused: str | None = None) -> str:
        raise AuthError(
            f"account {self.account!r} is not signed in: run `relayd login {self.account}`",
            needs_login=True,
        )


def token_provider(name: str, account: AccountConfig) -> TokenProvider:
    if account.token_command is not None:
        return CommandTokenProvider(name, account.token_command)
    if account.token_file is not None:
        return FileTokenProvider(name, account.token_file)
    return NotSignedIn(name)


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock so two daemons never deliver from one outbox."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"state_dir {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"state_dir {state_dir} is in use by another relayd process") from None
    return fd


class Supervisor:
    """Runs the relay for one config until `shutdown` is set."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.watchers: dict[str, DriveWatcher] = {}
        self.dispatchers: dict[str, Dispatcher] = {}
        self.outbox: Outbox | None = None
        self.started = asyncio.Event()  # set once every drive and webhook has its task

    async def run(self, shutdown: asyncio.Event) -> None:
        config = self.config
        lock = lock_state_dir(config.state_dir)
        try:
            async with AsyncExitStack() as stack:
                # One session for Graph, sockets and webhooks. No connection limit: dispatchers
                # bound their own concurrency, and with aiohttp's default of 100 the 101st
                # socket would wait forever for a free connection.
                session = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                )
                outbox = Outbox(config.state_dir / OUTBOX_FILE, on_insert=self._wake_dispatcher)
                try:
                    self.outbox = await stack.enter_async_context(outbox)
                except Exception as exc:
                    raise StartupError(str(exc)) from None
                await self._serve(session, self.outbox, shutdown)
        finally:
            os.close(lock)

    def _wake_dispatcher(self, webhook: str) -> None:
        dispatcher = self.dispatchers.get(webhook)
        if dispatcher is not None:
            dispatcher.wake()

    async def _serve(
        self, session: aiohttp.ClientSession, outbox: Outbox, shutdown: asyncio.Event
    ) -> None:
        config = self.config
        graph = GraphClient(session, config.graph.base_url)
        tokens = {name: token_provider(name, account) for name, account in config.accounts.items()}
        async with asyncio.TaskGroup() as group:
            dispatch_tasks = []
            for name, webhook in config.webhooks.items():
                dispatcher = Dispatcher(name, webhook, outbox, session)
                self.dispatchers[name] = dispatcher
                dispatch_tasks.append(
                    group.create_task(
                        dispatcher.run(grace=config.shutdown_grace), name=f"relayd-webhook-{name}"
                    )
                )
            watch_tasks = []
            for drive in config.drives:
                watcher = DriveWatcher(
                    drive,
                    graph=graph,
                    tokens=tokens[drive.account],
                    sink=outbox.add,
                    socket_session=session,
                )
                self.watchers[drive.name] = watcher
                watch_tasks.append(
                    group.create_task(
                        self._keep_watching(watcher), name=f"relayd-drive-{drive.name}"
                    )
                )
            prune = group.create_task(self._prune_loop(outbox), name="relayd-prune")
            log.info("started", drives=len(config.drives), webhooks=len(config.webhooks))
            self.started.set()

            await shutdown.wait()
            log.info("stopping")
            for watcher in self.watchers.values():
                watcher.stop()
            await _finish(watch_tasks, WATCHER_STOP_TIMEOUT)
            for dispatcher in self.dispatchers.values():
                dispatcher.stop()
            await _finish(dispatch_tasks, config.shutdown_grace + 5)
            prune.cancel()
        log.info("stopped")

    async def _keep_watching(self, watcher: DriveWatcher) -> None:
        """A drive's task: its watcher, restarted if it ever fails, never taking others down."""
        structlog.contextvars.bind_contextvars(drive=watcher.drive.name)
        while True:
            try:
                await watcher.run()
                return
            except Exception:
                watcher.log.exception(
                    "drive watcher failed; restarting it", retry_in=DRIVE_RESTART_DELAY
                )
            await asyncio.sleep(DRIVE_RESTART_DELAY)

    async def _prune_loop(self, outbox: Outbox) -> None:
        retention = self.config.outbox.delivered_retention
        while True:
            removed = await outbox.prune(time.time() - retention)
            if removed:
                log.info("pruned delivered notifications", count=removed)
            await asyncio.sleep(PRUNE_INTERVAL)


async def _finish(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Wait for tasks to end by themselves, then cancel whatever is left."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=timeout)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late)
