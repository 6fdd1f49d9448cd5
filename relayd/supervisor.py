"""The supervisor: builds the pipeline from a config and owns every task in it.

config -> supervisor -> one watcher per drive -> outbox -> one dispatcher per webhook.

It opens the outbox, starts a dispatcher per webhook and a watcher per drive in one TaskGroup,
and on shutdown takes them down in the order that loses nothing: watchers first (no new
notifications; what arrived is written out), then dispatchers (attempts under way get a grace
period), then the outbox (what is queued is committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from relayd import __version__, eventloop, logs
from relayd.admin import AdminServer, Metrics
from relayd.auth import (
    CommandTokenProvider,
    FileTokenProvider,
    HttpClient,
    MsalTokenProvider,
    TokenProvider,
)
from relayd.cluster.coordinator import Coordinator
from relayd.cluster.member import ClusterMember
from relayd.cluster.placement import Fence, drive_resource, webhook_resource
from relayd.config import (
    AccountConfig,
    Config,
    ConfigError,
    ConfigIssue,
    DriveConfig,
    load_config,
)
from relayd.delivery import Dispatcher
from relayd.graph import GraphClient
from relayd.network import Network, mask_proxy_url, trim_tls_read_buffers
from relayd.store import Backlog, Reservation, Store, open_store
from relayd.systemd import Notifier, watchdog_interval
from relayd.tenant import TenantReport, tenant_key
from relayd.watcher import ConnectGate, DriveState, DriveWatcher, Inbox

log = structlog.get_logger("relayd.supervisor")

LOCK_FILE = "relayd.lock"
DAEMON_FILE = "daemon.json"  # where the running daemon answers: its pid and admin address
WATCHER_STOP_TIMEOUT = 10.0  # watchers only close sockets and flush their queue to disk
DRIVE_RESTART_DELAY = 10.0  # after a watcher crashed on something unexpected
PRUNE_INTERVAL = 3600.0
PRUNE_RETRY = 60.0  # after a prune the store refused
DISPATCHER_RESTART_DELAY = 1.0  # after a dispatcher failed on something unexpected
EXIT_LOST = 3  # `relayd run`'s exit status when notifications were lost at the stop
STATUS_INTERVAL = 5.0  # backlog refresh and systemd STATUS= line


class StartupError(Exception):
    """relayd cannot start (state_dir locked or unusable, outbox unreadable). Safe to print."""


def token_provider(
    name: str, account: AccountConfig, state_dir: Path, *, sign_in: HttpClient | None = None
) -> TokenProvider:
    """The account's token source; client_id accounts use the sign-in `relayd login` stored
    under state_dir (until there is one, their drives wait in NEEDS_LOGIN), through `sign_in`
    (the HTTP client MSAL uses; None: MSAL's own)."""
    if account.token_command is not None:
        return CommandTokenProvider.from_config(name, account)
    if account.token_file is not None:
        return FileTokenProvider(name, account.token_file)
    return MsalTokenProvider(name, account, state_dir, http_client=sign_in)


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock so two daemons never deliver from one outbox."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = state_dir.stat()
        if folder.st_mode & 0o077 and folder.st_uid == os.geteuid():
            state_dir.chmod(0o700)  # made by an older relayd, or by hand
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"state_dir {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"state_dir {state_dir} is in use by another relayd process") from None
    # The pid lets `relayd reload` find the daemon that owns this state_dir.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def daemon_pid(state_dir: Path) -> int | None:
    """The pid of the relayd holding state_dir's lock, or None when none runs."""
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held: a daemon is running; its pid is in the file
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Supervisor:
    """Runs the relay for one config until `shutdown` is set; reloads it on request."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.watchers: dict[str, DriveWatcher] = {}
        self.dispatchers: dict[str, Dispatcher] = {}
        self.tokens: dict[str, TokenProvider] = {}
        self.outbox: Store | None = None
        self.admin: AdminServer | None = None
        self.started = asyncio.Event()  # set once every drive and webhook has its task
        self.started_at = time.time()
        self.backlog = Backlog()
        self.lost = 0  # notifications received but never stored: exit status 3 at the end
        self.last_reload_ok = True
        self.last_reload_error: str | None = None
        self._notifier = notifier or Notifier.from_environment()
        self._reload_requested = asyncio.Event()
        self._applied: Config | None = None
        self._drive_tasks: dict[str, asyncio.Task[None]] = {}
        self._dispatch_tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._graph: GraphClient | None = None
        self._gate: ConnectGate | None = None
        self.network: Network | None = None  # TLS trust and proxy environment, read at start
        self._graph_proxy: str | None = None
        self._sign_in: HttpClient | None = None
        # With a `cluster:` section: this replica's heartbeat and leases; watchers run only for
        # the drives it holds (and ordered webhooks' dispatchers only for those it holds).
        self.cluster: ClusterMember | None = None
        self._placing = asyncio.Lock()  # reloads and the cluster start and stop tasks in turn
        self.metrics = Metrics(self)  # last: its collector reads the attributes above

    def tenants(self) -> list[TenantReport]:
        """Each tenant's Graph budget and throttling, for /status and the metrics."""
        return self._graph.tenants() if self._graph is not None else []

    def request_reload(self) -> None:
        """Ask for the config file to be read again (safe to call from a signal handler)."""
        self._reload_requested.set()

    # -- life ------------------------------------------------------------------------------------

    async def run(self, shutdown: asyncio.Event) -> None:
        config = self.config
        lock = lock_state_dir(config.state_dir)
        try:
            trim_tls_read_buffers()  # a drive's memory over wss: see relayd.network
            try:
                self.network = Network.from_environment(config.tls.ca_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise StartupError(f"cannot load the CA bundle of SSL_CERT_FILE: {exc}") from None
            if any(self.network.summary().values()) or config.graph.proxy is not None:
                log.info(
                    "outbound proxies",
                    graph_proxy=None
                    if config.graph.proxy is None
                    else mask_proxy_url(config.graph.proxy) or "direct",
                    **self.network.summary(),
                )
            async with AsyncExitStack() as stack:
                # One session for Graph, sockets and webhooks. No connection limit: dispatchers
                # bound their own concurrency, and with aiohttp's default of 100 the 101st
                # socket would wait forever for a free connection. Its connector holds the one
                # SSL context (system CAs plus tls.ca_file) every TLS connection verifies with.
                self._session = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=self.network.connector(limit=0))
                )
                outbox = open_store(
                    config.store.url,
                    config.state_dir,
                    recover=True,
                    router=self,
                    disk_reserve=config.outbox.disk_reserve,
                    # In a cluster the rows it claims are marked with the replica's name.
                    replica=None if config.cluster is None else config.cluster.replica,
                )
                try:
                    self.outbox = await stack.enter_async_context(outbox)
                except Exception as exc:
                    raise StartupError(str(exc)) from None
                if config.admin.enabled:
                    admin = AdminServer(self, config.admin.host, config.admin.port)
                    try:
                        self.admin = await stack.enter_async_context(admin)
                    except OSError as exc:
                        raise StartupError(
                            f"admin.listen {config.admin.listen}: {exc.strerror}"
                        ) from None
                if config.cluster is not None:
                    self.cluster = self._join_cluster(config)
                await self._serve(shutdown)
        finally:
            os.close(lock)

    def _join_cluster(self, config: Config) -> ClusterMember:
        """This replica's member of the cluster; its loop starts with the other housekeeping."""
        assert config.cluster is not None and config.store.url is not None  # config checks it
        identity = self.identity()
        coordinator = Coordinator(
            config.store.url,
            config.cluster.replica,
            config.cluster.lease,
            info={
                "version": __version__,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "admin": identity["admin"],
            },
        )
        member = ClusterMember(coordinator, self, config.cluster.lease)
        coordinator.on_change = member.wake
        log.info(
            "joining the cluster",
            replica=config.cluster.replica,
            lease=config.cluster.lease,
            store=coordinator.describe(),
        )
        return member

    async def _serve(self, shutdown: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            await self._apply(self.config)
            housekeeping = [
                group.create_task(self._prune_loop(), name="relayd-prune"),
                group.create_task(self._tick_loop(), name="relayd-tick"),
            ]
            placement = None
            if self.cluster is not None:
                placement = group.create_task(self.cluster.run(), name="relayd-cluster")
            # The backlog was read by the first _apply, for its warning about orphaned rows.
            config = self.config
            log.info(
                "started",
                version=__version__,
                loop=eventloop.running(),
                config=str(self.config_path) if self.config_path else None,
                state_dir=str(config.state_dir),
                store=_store_line(self.outbox) if self.outbox else None,
                admin=f"http://{config.admin.listen}" if config.admin.enabled else "off",
                drives=len(self.watchers),
                webhooks=len(self.dispatchers),
                accounts=len(config.accounts),
                waiting=sum(self.backlog.counts.values()),
            )
            self.started.set()
            self._write_daemon_file()
            self._notifier.ready(self.status_line())

            stop = asyncio.create_task(shutdown.wait())
            try:
                while not shutdown.is_set():
                    reload = asyncio.create_task(self._reload_requested.wait())
                    await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                    reload.cancel()
                    if self._reload_requested.is_set() and not shutdown.is_set():
                        self._reload_requested.clear()
                        await self.reload()
            finally:
                stop.cancel()
            self._notifier.stopping()
            log.info("stopping")
            if placement is not None:  # takes nothing more while the rest stops
                placement.cancel()
                await asyncio.gather(placement, return_exceptions=True)
            await self._stop_watchers(list(self.watchers))
            if self.cluster is not None:  # the others take the drives now, not after `lease`
                await self.cluster.release("drive:")
            await self._stop_dispatchers(list(self.dispatchers))
            if self.cluster is not None:
                await self.cluster.leave()
            for task in housekeeping:
                task.cancel()
        self._group = None
        with contextlib.suppress(OSError):
            (self.config.state_dir / DAEMON_FILE).unlink()
        # What the next start delivers: stored, so not lost, but an operator wants the count.
        await self.refresh_backlog()
        waiting = {name: count for name, count in self.backlog.counts.items() if count}
        if self.lost:
            log.error(
                "stopped; notifications received from Graph were lost",
                lost=self.lost,
                waiting=sum(waiting.values()),
                waiting_per_webhook=waiting,
            )
        else:
            log.info("stopped", waiting=sum(waiting.values()), waiting_per_webhook=waiting)

    # -- reload ----------------------------------------------------------------------------------

    async def reload(self, new: Config | None = None) -> bool:
        """Apply a new config: re-read from `config_path` unless one is given.

        An invalid file changes nothing. A valid one is diffed against the running set: only
        drives and webhooks that were added, removed or changed are touched.
        """
        self._notifier.reloading()
        try:
            if new is None:
                if self.config_path is None:
                    raise ConfigError(
                        [ConfigIssue("relayd", None, "", "started without a config file")]
                    )
                new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            self.last_reload_ok, self.last_reload_error = False, str(exc)
            self.metrics.reloaded(False)
            log.error(
                "config reload refused; the running config stays", errors=str(exc).splitlines()
            )
            self._notifier.ready(self.status_line())
            return False
        for key in ("state_dir", "admin", "tls"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("this setting takes effect after a restart", key=key)
        if new.cluster != self.config.cluster:  # the replica's name and lease are its identity
            log.warning("this setting takes effect after a restart", key="cluster")
        if new.log != self.config.log:
            logs.configure(new.log.level, new.log.format)
        async with self._placing:
            await self._apply(new)
        self.config = new
        if self.cluster is not None:  # drives added or removed: place them now
            self.cluster.wake()
        self.last_reload_ok, self.last_reload_error = True, None
        self.metrics.reloaded(True)
        log.info("config reloaded", drives=len(self.watchers), webhooks=len(self.dispatchers))
        self._notifier.ready(self.status_line())
        return True

    async def _apply(self, new: Config) -> None:
        """Bring the running tasks in line with `new`, touching only what differs."""
        old = self._applied
        assert self._session is not None and self.network is not None
        graph_changed = old is None or old.graph != new.graph
        if graph_changed:
            # graph.proxy covers everything towards Microsoft: Graph, the push socket, sign-in.
            self._graph_proxy = new.graph.proxy
            self._sign_in = self.network.sign_in_session(new.graph.proxy)
            self._graph = GraphClient(
                self._session,
                new.graph.base_url,
                request_options=self.network.request_options(new.graph.base_url, new.graph.proxy),
                requests_per_minute=new.graph.requests_per_minute,
            )
            self._gate = ConnectGate(new.graph.connect_concurrency, new.graph.connect_rate)

        proxy_changed = old is None or old.graph.proxy != new.graph.proxy  # sign-in's too
        accounts_changed = {
            name
            for name, account in new.accounts.items()
            if proxy_changed or old is None or old.accounts.get(name) != account
        }
        old_webhooks = {} if old is None else old.webhooks
        webhooks_gone = [name for name in old_webhooks if name not in new.webhooks]
        webhooks_changed = [
            name for name, hook in new.webhooks.items() if old_webhooks.get(name) != hook
        ]
        old_drives = {} if old is None else {drive.name: drive for drive in old.drives}
        new_drives = {drive.name: drive for drive in new.drives}
        drives_gone = [name for name in old_drives if name not in new_drives]
        drives_changed = [
            name
            for name, drive in new_drives.items()
            if old_drives.get(name) != drive or drive.account in accounts_changed or graph_changed
        ]

        # A changed drive's new watcher goes on from what the old one could not store yet.
        carried = await self._stop_watchers(
            drives_gone + [n for n in drives_changed if n in self.watchers],
            keep=frozenset(drives_changed),
        )
        await self._stop_dispatchers(
            webhooks_gone + [n for n in webhooks_changed if n in self.dispatchers]
        )
        for name in accounts_changed:
            self.tokens[name] = token_provider(
                name, new.accounts[name], new.state_dir, sign_in=self._sign_in
            )
        for name in [n for n in self.tokens if n not in new.accounts]:
            del self.tokens[name]
        for name in webhooks_changed:
            if self._runs_webhook(name, new):
                self._start_dispatcher(name, new)
        for name in drives_changed:
            fence = None if self.cluster is None else self.cluster.fence(drive_resource(name))
            if self.cluster is None or fence is not None:  # in a cluster: the drives it holds
                self._start_watcher(new_drives[name], carried.get(name), new, fence=fence)
        self._applied = new
        if old is not None:
            log.info(
                "applied config changes",
                drives_started=sorted(drives_changed),
                drives_stopped=sorted(drives_gone),
                webhooks_restarted=sorted(webhooks_changed),
                webhooks_stopped=sorted(webhooks_gone),
            )
        if old is None or webhooks_gone:
            await self._warn_of_orphans(new)

    async def _warn_of_orphans(self, config: Config) -> None:
        """Rows kept for webhooks the config no longer has wait for nobody: say so, once at start
        and at each reload that removes a webhook. They are kept: a rename or a mistake is
        undone by putting the webhook back."""
        await self.refresh_backlog()
        for webhook, waiting in sorted(self.backlog.counts.items()):
            if webhook not in config.webhooks:
                log.warning(
                    "notifications wait in the outbox for a webhook that is not configured",
                    webhook=webhook,
                    waiting=waiting,
                    to_deliver=f"add webhook {webhook!r} back to the config and reload",
                    to_delete=f"relayd outbox purge --webhook {webhook} --state pending",
                )

    def _start_dispatcher(self, name: str, config: Config) -> None:
        assert self._group is not None and self._session is not None and self.outbox is not None
        assert self.network is not None
        hook = config.webhooks[name]
        dispatcher = Dispatcher(
            name,
            config.webhooks[name],
            self.outbox,
            self._session,
            on_result=self.metrics.observe,
            request_options=self.network.request_options(hook.url, hook.proxy),
        )
        self.dispatchers[name] = dispatcher
        # Restarted if it ever fails; what it had claimed went back to the queue as it ended.
        grace = config.shutdown_grace
        self._dispatch_tasks[name] = self._group.create_task(
            _keep_running(
                lambda: dispatcher.run(grace=grace),
                what="webhook dispatcher",
                logger=log.bind(webhook=name),
                delay=DISPATCHER_RESTART_DELAY,
            ),
            name=f"relayd-webhook-{name}",
        )

    def _socket_options(self, url: str) -> dict[str, Any]:
        """aiohttp arguments for a drive's socket to `url`: graph.proxy, or the environment's."""
        assert self.network is not None
        return self.network.request_options(url, self._graph_proxy)

    def _start_watcher(
        self, drive: DriveConfig, inbox: Inbox | None, config: Config, *, fence: Fence | None = None
    ) -> None:
        assert self._group is not None and self._graph is not None and self._gate is not None
        assert self.outbox is not None
        watcher = DriveWatcher(
            drive,
            tenant=tenant_key(drive.account, config.accounts[drive.account]),
            graph=self._graph,
            tokens=self.tokens[drive.account],
            outbox=self.outbox,
            socket_session=self._session,
            socket_options=self._socket_options,
            gate=self._gate,
            inbox=inbox,
            fence=fence,
        )
        self.watchers[drive.name] = watcher
        self._drive_tasks[drive.name] = self._group.create_task(
            self._keep_watching(watcher), name=f"relayd-drive-{drive.name}"
        )

    async def _stop_watchers(
        self,
        names: list[str],
        *,
        keep: frozenset[str] = frozenset(),
        within: float = WATCHER_STOP_TIMEOUT,
    ) -> dict[str, Inbox]:
        """Watchers close their sockets and write out what they hold, then end.

        What one could not write (the store failing) is handed back for the drives in `keep`,
        whose new watcher goes on from it; for the others it is lost, and said so: counted in
        `lost`, logged, and the daemon's exit status.
        """
        for name in names:
            self.watchers[name].stop()
        # Forgotten only once ended: a stop cancelled half-way (placement, cancelled at shutdown
        # while its guard was stopping drives) leaves them for the next stop to finish.
        await _finish([self._drive_tasks[name] for name in names], within)
        carried: dict[str, Inbox] = {}
        for name in names:
            del self._drive_tasks[name]
            watcher = self.watchers.pop(name)
            if name in keep:
                carried[name] = watcher.inbox
                continue
            lost = watcher.inbox.close()
            if lost:
                self.lost += lost
                watcher.log.error(
                    "notifications received from Graph could not be stored and are lost",
                    lost=lost,
                    outbox_error=self.outbox.last_error if self.outbox else None,
                )
        return carried

    async def _stop_dispatchers(self, names: list[str]) -> None:
        """Dispatchers give attempts under way the grace period; the rest waits on disk."""
        for name in names:
            self.dispatchers[name].stop()
        grace = self.config.shutdown_grace
        await _finish([self._dispatch_tasks[name] for name in names], grace + 5)
        for name in names:  # as above: forgotten only once ended
            del self._dispatch_tasks[name]
            del self.dispatchers[name]

    # -- the outbox's Router: new rows go to the webhook's dispatcher -----------------------------

    def reserve(self, webhook: str, count: int) -> Reservation | None:
        # The reservation is the dispatcher's own: its rows go to it, or back to the queue if
        # a reload stopped it meanwhile, never to whichever dispatcher has the name by then.
        dispatcher = self.dispatchers.get(webhook)
        return None if dispatcher is None else dispatcher.reserve(count)

    def wake(self, webhook: str) -> None:
        dispatcher = self.dispatchers.get(webhook)
        if dispatcher is not None:
            dispatcher.wake()

    # -- the cluster's Holder: what this replica holds is what it runs -----------------------------

    def _runs_webhook(self, name: str, config: Config) -> bool:
        """Every replica runs every webhook's dispatcher (rows are claimed with SKIP LOCKED),
        except an ordered webhook's: only the replica holding its lease runs that one."""
        if self.cluster is None or not config.webhooks[name].ordered:
            return True
        return self.cluster.fence(webhook_resource(name)) is not None

    def resources(self) -> list[str]:
        config = self._applied or self.config
        return [drive_resource(drive.name) for drive in config.drives] + [
            webhook_resource(name) for name, hook in config.webhooks.items() if hook.ordered
        ]

    async def take(self, fence: Fence) -> None:
        kind, _, name = fence.resource.partition(":")
        async with self._placing:
            config = self._applied
            if config is None or self._group is None:
                return
            if kind == "drive" and name not in self.watchers:
                drive = next((d for d in config.drives if d.name == name), None)
                if drive is not None:
                    self._start_watcher(drive, None, config, fence=fence)
            elif kind == "webhook" and name in config.webhooks and name not in self.dispatchers:
                self._start_dispatcher(name, config)

    async def drop(self, resources: Sequence[str], *, within: float) -> None:
        async with self._placing:
            config = self._applied or self.config
            named = [resource.partition(":") for resource in resources]
            drives = [name for kind, _, name in named if kind == "drive" and name in self.watchers]
            hooks = [
                name
                for kind, _, name in named
                if kind == "webhook"
                and name in self.dispatchers
                and (name not in config.webhooks or config.webhooks[name].ordered)
            ]
            await self._stop_watchers(drives, within=within)
            await self._stop_dispatchers(hooks)

    # -- the drives' tasks and housekeeping -------------------------------------------------------

    async def _keep_watching(self, watcher: DriveWatcher) -> None:
        """A drive's task: its watcher, restarted if it ever fails."""
        structlog.contextvars.bind_contextvars(drive=watcher.drive.name)
        await _keep_running(
            watcher.run, what="drive watcher", logger=watcher.log, delay=DRIVE_RESTART_DELAY
        )
        if watcher.fenced and self.cluster is not None:  # another replica holds it now
            self.cluster.fenced(drive_resource(watcher.drive.name))

    async def _prune_loop(self) -> None:
        """Forget delivered rows past their retention, hourly. A store that fails (a CLI holding
        its lock, a disk error) is tried again sooner; it never ends the daemon."""
        assert self.outbox is not None
        while True:
            retention = self.config.outbox.delivered_retention
            try:
                removed = await self.outbox.prune(time.time() - retention)
            except Exception as exc:
                log.error("cannot prune the outbox", error=str(exc), retry_in=PRUNE_RETRY)
                await asyncio.sleep(PRUNE_RETRY)
                continue
            if removed:
                log.info("pruned delivered notifications", count=removed)
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _tick_loop(self) -> None:
        """Watchdog pings and the status line, from the event loop itself: a stuck loop stops
        them, and systemd restarts the service."""
        watchdog = watchdog_interval()
        tick = min(STATUS_INTERVAL, watchdog) if watchdog else STATUS_INTERVAL
        last_status = 0.0
        while True:
            if watchdog:
                self._notifier.watchdog()
            if time.monotonic() - last_status >= STATUS_INTERVAL:
                last_status = time.monotonic()
                try:
                    await self.refresh_backlog()
                    self._notifier.status(self.status_line())
                    for name, dispatcher in self.dispatchers.items():
                        dispatcher.check_health(waiting=self.backlog.counts.get(name, 0))
                    for watcher in self.watchers.values():
                        watcher.check_health()
                except Exception:
                    # The watchdog pings above must go on whatever the status line meets.
                    log.exception("cannot refresh the status line")
            await asyncio.sleep(tick)

    async def refresh_backlog(self) -> None:
        if self.outbox is None:
            return
        try:
            self.backlog = await self.outbox.backlog()
        except Exception as exc:  # the last figures stay; the next refresh may well work
            log.error("cannot read the outbox backlog", error=str(exc))

    def _write_daemon_file(self) -> None:
        """Where this daemon answers, in state_dir: `relayd status` finds it there even when the
        config file on disk no longer loads (that is when it is needed)."""
        path = self.config.state_dir / DAEMON_FILE
        try:
            fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as file:
                json.dump(self.identity(), file)
            os.replace(path.with_suffix(".tmp"), path)
        except OSError as exc:  # a convenience for the CLI: never a reason to stop relaying
            log.warning("cannot write the daemon file", path=str(path), error=str(exc))

    def identity(self) -> dict[str, Any]:
        """Which daemon this is, for /status and the state_dir's daemon file."""
        admin = self.admin
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started_at,
            "config": str(self.config_path) if self.config_path else None,
            "state_dir": str(self.config.state_dir),
            "admin": None if admin is None else self.config.admin.local_url(admin.port),
        }

    def status_line(self) -> str:
        """systemd's STATUS=: one line a person reads in `systemctl status`."""
        connected = sum(1 for w in self.watchers.values() if w.status.state is DriveState.CONNECTED)
        waiting = sum(self.backlog.counts.values())
        return f"{connected}/{len(self.watchers)} drives connected, {waiting} notifications waiting"


async def _keep_running(
    run: Callable[[], Awaitable[None]], *, what: str, logger: Any, delay: float
) -> None:
    """A long-lived task's body, run again `delay` seconds after it fails on something
    unexpected: one failed task of the TaskGroup would cancel every other, ending the daemon."""
    while True:
        try:
            await run()
            return
        except Exception:
            logger.exception(f"{what} failed; restarting it", retry_in=delay)
        await asyncio.sleep(delay)


async def _finish(tasks: list[asyncio.Task[None]], within: float) -> None:
    """Wait for tasks to end by themselves, then cancel whatever is left."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=within)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late)


def _store_line(store: Store) -> str:
    """The start line's store: "sqlite /path/outbox.sqlite3", or the URL (log-safe), which names
    PostgreSQL already."""
    where = store.describe()
    return where if where.startswith(store.kind) else f"{store.kind} {where}"
