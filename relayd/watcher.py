"""One drive's watcher: holds its socketIo connection and writes what arrives to the outbox.

Life of a watcher: fetch the socketIo endpoint, connect, relay notifications; before the endpoint
expires, fetch a fresh one, connect to it, then close the old socket (make before break); when the
connection drops, the server says goodbye, or the line goes silent, reconnect with a fresh endpoint
and jittered exponential backoff, for as long as the drive is configured.

Notifications go into a bounded per-drive inbox, in arrival order, and one pump writes them to the
outbox. When the store falls behind or cannot write (a full disk), the inbox fills and the socket's
reads wait, so TCP pushes back on the sender instead of memory growing. The inbox belongs to the
watcher, not to one run of it: a watcher restarted after a crash goes on from what it held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import aiohttp
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from relayd.auth import AuthError, TokenProvider
from relayd.config import DriveConfig, drive_address, needs_lookup
from relayd.delta import ChangeFeed
from relayd.events import notification_deliveries, resync_deliveries
from relayd.graph import (
    DriveLookupError,
    GraphClient,
    GraphError,
    InvalidGraphResponse,
    MalformedNotification,
    Subscription,
    backoff_delay,
    parse_notification_event,
    retry_delay,
    travels_unencrypted,
)
from relayd.network import describe_connection_error
from relayd.outage import Outage, Report, log_report
from relayd.push import Frame, LineLost, PingTimes, ProtocolError, PushSocket, Refused
from relayd.store import Fence, Fenced, NewDelivery, OutboxError, Store
from relayd.tenant import DEFAULT_TENANT, Priority
from relayd.waiting import wait_event

# Renew this long before the endpoint expires (known clients use two minutes) ...
RENEW_MARGIN = 120.0
# ... but never later than half the remaining lifetime (a short lifetime must not turn into a
# renewal loop), never sooner than this floor ...
RENEW_FLOOR = 5.0
# ... and every 30 minutes when Graph gives no expiry at all.
RENEW_WITHOUT_EXPIRY = 30 * 60.0

NOT_SUPPORTED_RETRY = 15 * 60.0  # "this drive cannot be watched": ask again, rarely
NEEDS_LOGIN_RETRY = 60.0  # an account waiting for `relayd login`
HEALTHY_CONNECTION = 30.0  # a connection that lived this long resets the backoff
CONNECT_TIMEOUT = 15.0
CLOSE_TIMEOUT = 2.0
QUEUE_ITEMS = 1000  # notification events held in memory per drive before the socket waits
DEDUPE_WINDOW = 10.0  # during a switch-over, the same notification from the other socket is a copy
OUTBOX_RETRY = 1.0
# On stop, how long what the inbox holds may take to reach the outbox. Below the supervisor's
# WATCHER_STOP_TIMEOUT, so that what cannot be written is counted and said, not cut short.
FLUSH_TIMEOUT = 5.0
# A line is given up after pingInterval + pingTimeout of silence, both taken from the server's
# Engine.IO OPEN packet (relayd.push): a server that announced a day and went quiet would keep a
# dead drive "connected" for a day. Engine.IO's defaults, which Graph announces, are 25 s and
# 20 s; these caps are 12x and 6x that, so no sane server is cut short, and a silent line is
# noticed within 7 minutes whatever was announced. A server that really pings less often than
# this gets a reconnect (a fresh endpoint and a resync) every 7 minutes, not a dead socket.
MAX_PING_INTERVAL = 5 * 60.0
MAX_PING_TIMEOUT = 2 * 60.0

T = TypeVar("T")

_log = structlog.get_logger("relayd.watcher")


class DriveState(StrEnum):
    STARTING = "starting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    NOT_SUPPORTED = "not_supported"  # Graph said 400 notSupported for this drive
    NEEDS_LOGIN = "needs_login"  # the account cannot produce a token without a person
    STOPPED = "stopped"


@dataclass
class DriveStatus:
    """What a watcher reports about itself (for logs, `relayd status`, metrics)."""

    state: DriveState = DriveState.STARTING
    since: float = field(default_factory=time.time)
    last_notification: float | None = None
    last_error: str | None = None
    received: int = 0
    malformed: int = 0
    duplicates: int = 0
    reconnects: int = 0
    renewals: int = 0
    endpoint: str | None = None  # the notificationUrl without its query: safe to show
    drive_id: str | None = None  # what the resource resolved to (`me` -> drives/{drive_id})

    def enter(self, state: DriveState, error: str | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()
        self.last_error = error


def renewal_delay(expires_at: datetime | None, now: datetime) -> float:
    """Seconds from `now` until a fresh endpoint should be fetched; pure."""
    if expires_at is None:
        return RENEW_WITHOUT_EXPIRY
    remaining = (expires_at - now).total_seconds()
    return max(RENEW_FLOOR, max(remaining - RENEW_MARGIN, remaining / 2))


def connect_wait(state: RetryCallState) -> float:
    """tenacity wait: how long to wait after a failed attempt to fetch and connect."""
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, GraphError) and error.not_supported:
        return NOT_SUPPORTED_RETRY * (0.9 + 0.2 * random.random())
    if isinstance(error, AuthError) and error.needs_login:
        return max(backoff_delay(state.attempt_number), NEEDS_LOGIN_RETRY)
    return retry_delay(state.attempt_number, error)


def dedupe_key(item: Mapping[str, Any]) -> str:
    """The notification minus what differs between two subscriptions of one drive."""
    kept = {
        k: v
        for k, v in item.items()
        if k
        not in (
            "subscriptionId",
            "clientState",
            "expirationDateTime",
            "subscriptionExpirationDateTime",
        )
    }
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


class ConnectGate:
    """Paces socket connects (to the push service) across every drive of the process.

    At most `concurrency` at once, and their starts spaced to at most `rate` per second: a
    process with thousands of drives starts (or reconnects after a blip) as a steady stream.
    The Graph requests before them (endpoint fetches) are paced by their tenant's budget
    instead (relayd/tenant.py).
    """

    def __init__(self, concurrency: int, rate: float) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._spacing = 1.0 / rate
        self._next_start = 0.0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._spacing
            if start > now:
                await asyncio.sleep(start - now)
            yield


class Inbox:
    """Notifications a drive received and has not stored yet, in arrival order.

    `put` waits while `limit` events are held: the socket's read loop waits with it, and TCP
    pushes back on Graph. `notice` (the drive's own drive.resync events) never waits and never
    raises; at most one unstored notice is held, since a second says nothing the first does not.
    The pump `take`s everything at once; what it took stays here (`taken`) until it is stored,
    so neither a failed write nor a restarted pump loses it. The inbox outlives a watcher: one
    restarted after a crash, or by a reload that changed its drive, goes on from it.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._events: collections.deque[list[NewDelivery]] = collections.deque()
        self.taken: list[NewDelivery] = []  # with the pump, not yet committed
        self._held = 0  # notifications in _events and taken (each once, whatever its webhooks)
        self._notice_held = False
        self._changed = asyncio.Event()
        self._open = True
        self.refused = 0  # notifications that arrived after close(): received, never held

    def __len__(self) -> int:
        """Notifications held (taken or waiting): what a crash or a stop would lose."""
        return self._held

    async def put(self, deliveries: list[NewDelivery]) -> None:
        while self._open and len(self._events) >= self._limit:
            self._changed.clear()
            await self._changed.wait()
        if not self._open:
            self.refused += _notifications(deliveries)
            return
        self._events.append(deliveries)
        self._held += _notifications(deliveries)
        self._changed.set()

    def notice(self, deliveries: list[NewDelivery]) -> bool:
        """Hold a notice of the drive's own; False if one is already waiting to be stored."""
        if self._notice_held or not self._open:
            return False
        self._notice_held = True
        self._events.append(deliveries)
        self._held += _notifications(deliveries)
        self._changed.set()
        return True

    async def take(self) -> list[NewDelivery]:
        """What the pump stores next: what it took before (not yet stored), else all that waits."""
        while not self.taken:
            if self._events:
                self.taken = [d for event in self._events for d in event]
                self._events.clear()
                self._notice_held = False
                self._changed.set()  # room for put()
                break
            self._changed.clear()
            await self._changed.wait()
        return self.taken

    def stored(self) -> None:
        self._held -= _notifications(self.taken)
        self.taken = []
        self._changed.set()

    def close(self) -> int:
        """The drive is going away for good: refuse (and count) what still arrives, and say how
        many notifications received from Graph were never stored."""
        self._open = False
        self._changed.set()
        return self._held + self.refused

    async def emptied(self, timeout: float) -> bool:
        """Wait until everything held is stored; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while len(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            await wait_event(self._changed, left)
        return True


def _notifications(deliveries: list[NewDelivery]) -> int:
    """Notifications among deliveries: one per webhook-id, however many webhooks it goes to."""
    return len({delivery.message_id for delivery in deliveries})


class ConnectionLost(Exception):
    """The socket is gone; the watcher fetches a fresh endpoint and connects again."""


def cap_ping_times(times: PingTimes) -> PingTimes:
    """Trust the server's ping times only up to the caps (see MAX_PING_INTERVAL). Logged from
    the drive's task, which binds the drive's name to its lines."""
    capped = PingTimes(min(times.interval, MAX_PING_INTERVAL), min(times.timeout, MAX_PING_TIMEOUT))
    if capped != times:
        _log.warning(
            "server announced ping times beyond the caps; a silent line is noticed sooner",
            ping_interval=times.interval,
            ping_timeout=times.timeout,
            capped_to=[capped.interval, capped.timeout],
        )
    return capped


class DriveWatcher:
    """Watches one drive until stopped. `run()` is its whole life; `stop()` ends it cleanly."""

    def __init__(
        self,
        drive: DriveConfig,
        *,
        graph: GraphClient,
        tokens: TokenProvider,
        outbox: Store,
        socket_session: aiohttp.ClientSession | None = None,
        socket_options: Callable[[str], Mapping[str, Any]] | None = None,
        gate: ConnectGate,
        inbox: Inbox | None = None,
        tenant: str = DEFAULT_TENANT,
        fence: Fence | None = None,
    ) -> None:
        """`inbox`: what an earlier watcher of the same drive held, to go on from; `tenant`:
        whose Graph budget and throttling the drive's requests share (tenant.tenant_key);
        `fence`: the cluster lease every write of this drive is made under (None: no cluster)."""
        self.fence = fence
        self.fenced = False  # the store refused a write: another replica holds the drive now
        self.drive = drive
        self.tenant = tenant
        self.status = DriveStatus()
        self._graph = graph
        self._tokens = tokens
        self._outbox = outbox
        self._socket_session = socket_session
        # Extra aiohttp arguments for a socket's connect to a URL (the proxy for its host).
        self._socket_options = socket_options or (lambda _url: {})
        self._gate = gate
        # In changes mode notifications only trigger delta rounds; the feed posts the items.
        self.feed = (
            ChangeFeed(
                drive,
                graph=graph,
                tokens=tokens,
                outbox=outbox,
                tenant=tenant,
                fence=fence,
                on_fenced=self._lost_lease,
            )
            if drive.mode == "changes"
            else None
        )
        self.inbox = inbox or Inbox(QUEUE_ITEMS)
        # Where the socketIo and delta requests go: drives/{id} once the resource is resolved.
        self.address = drive.resource
        self._seen_before: bool | None = None  # the drive ran before, with this resource
        self._write_failing_since: float | None = None
        self._stopping = asyncio.Event()
        self._generation = 0
        self._recent: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._sockets = 0  # open connections: two only during a switch-over
        self._live: list[_Connection] = []  # those connections, for stop() to wake their reads
        self._attempt: asyncio.Future[Any] | None = None  # a connect under way, for stop()
        self._dedupe_until = 0.0
        self.log = structlog.get_logger("relayd.watcher").bind(drive=drive.name)
        # Each failed connect is logged at debug level; the outage is what is logged above it.
        self.outage = Outage()

    def stop(self) -> None:
        """Stop taking notifications; `run()` returns once what arrived is in the outbox, or
        once FLUSH_TIMEOUT has passed: then `inbox` still holds what could not be written."""
        self._stopping.set()
        for connection in self._live:
            connection.wake("stop")
        # A stop does not wait for a connect or preparation under way: its tenant's turn (a
        # throttled tenant waits out Retry-After), a first delta round, a store that cannot be
        # written. A reload, a hand-over or SIGTERM would otherwise wait up to its bound. One
        # that has just ended keeps its result (a socket just opened is the watcher's to close).
        if self._attempt is not None and not self._attempt.done():
            self._attempt.cancel()

    async def run(self) -> None:
        name = self.drive.name
        helpers = [asyncio.create_task(self._pump(), name=f"relayd-pump-{name}")]
        if self.feed is not None:
            helpers.append(asyncio.create_task(self.feed.run(), name=f"relayd-delta-{name}"))
        try:
            if await self._retrying(self._prepare) is not None:
                await self._watch()
            # Closed sockets bring nothing new: write out what is held, then stop (unless the
            # drive is another replica's now: then nothing more may be written).
            if not self.fenced:
                await self.inbox.emptied(FLUSH_TIMEOUT)
        except Fenced as exc:
            self._lost_lease(exc)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for connection in list(self._live):  # one opened as the watcher was cancelled
                await connection.close()
            if self._stopping.is_set():  # not a crash, after which a new run goes on
                self.status.enter(DriveState.STOPPED)

    async def _prepare(self) -> bool:
        """Before the first connect: the delta cursor (changes mode), or a resync notice if the
        drive ran before (notifications mode: whatever happened while relayd was stopped is
        gone). Both after the drive id is known, so both go through drives/{id}."""
        if self._seen_before is None:  # asked before the drive id below writes the drive's row
            stored = await self._outbox.drive_state(self.drive.name)
            self._seen_before = stored is not None and stored[0] == self.drive.resource
        self.address = await self._resolve()
        if self.feed is not None:
            await self.feed.ensure_cursor(self.address)
            return True
        if self._seen_before:
            self._resync("restart")
        else:
            await self._outbox.save_drive_state(
                self.drive.name, self.drive.resource, None, fence=self.fence
            )
        return True

    async def _resolve(self) -> str:
        """The drive's `drives/{id}` address: looked up once per resource, then remembered in
        the outbox, so a restart asks Graph nothing; a changed resource is looked up again."""
        drive = self.drive
        if not needs_lookup(drive.resource):
            self.status.drive_id = drive.resource.partition("/")[2]
            return drive.resource
        stored = await self._outbox.drive_id(drive.name)
        if stored is not None and stored[0] == drive.resource:
            drive_id = stored[1]
        else:
            drive_id = await self._look_up()
            await self._outbox.save_drive_id(drive.name, drive.resource, drive_id)
            self.log.info("drive id looked up", resource=drive.resource, drive_id=drive_id)
        self.status.drive_id = drive_id
        return drive_address(drive.resource, drive_id)

    async def _look_up(self) -> str:
        drive = self.drive
        # As in _open: the token first. The lookup is a Graph request, paced by its tenant's
        # turn (not the connect slot, which a throttled tenant's drives must not hold).
        token = await self._tokens.token()

        async def bearer(refused: str | None) -> str:
            return token if refused is None else await self._tokens.token(refused)

        try:
            return await self._graph.drive_id(
                drive.resource, bearer, tenant=self.tenant, drive=drive.name
            )
        except GraphError as error:
            raise DriveLookupError(drive.name, drive.resource, error) from None
        except InvalidGraphResponse as error:
            raise InvalidGraphResponse(
                f"drive {drive.name!r}: cannot look up the drive id of {drive.resource!r}: {error}"
            ) from None

    def _connected(self, how: str) -> None:
        """A socket is up after `how` ("start", "reconnect" or "renewal")."""
        self.check_health(self.outage.succeeded(time.monotonic()))
        if self.feed is not None:
            self.feed.catch_up(how)  # changes made while nobody listened
        elif how == "reconnect":
            self._resync(how)

    def _resync(self, reason: str) -> None:
        drive = self.drive
        notice = resync_deliveries(drive.name, drive.resource, drive.webhook, reason, time.time())
        # Never waits, even with the inbox full (the store failing while the line drops).
        if not self.inbox.notice(notice):
            self.log.debug("a drive.resync is already waiting to be stored", reason=reason)

    # -- connection management ------------------------------------------------------------------

    async def _watch(self) -> None:
        current: _Connection | None = None
        try:
            how = "start"
            while not self._stopping.is_set():
                if current is None:
                    current = await self._retrying(self._open)
                    if current is None:
                        return  # stopped while trying
                    self.status.enter(DriveState.CONNECTED)
                    self._connected(how)
                renew_in = renewal_delay(current.subscription.expires_at, datetime.now(UTC))
                # The drive's own task reads its socket until it is lost, a renewal is due or
                # the drive stops: no task of its own for the socket, no waiters (relayd.push).
                outcome = await current.relay(renew_in)
                if outcome == "stop":
                    return
                if outcome == "lost":
                    self.status.reconnects += 1
                    self.status.enter(DriveState.RECONNECTING, current.lost_reason)
                    self.log.warning("connection lost", reason=current.lost_reason)
                    await current.close()
                    if current.age < HEALTHY_CONNECTION:
                        # It died young: pause before hammering Graph again.
                        await self._pause(backoff_delay(max(1, self.status.reconnects)))
                    current, how = None, "reconnect"
                    continue
                current = await self._renew(current)
        finally:
            if current is not None:
                await current.close()

    async def _pause(self, seconds: float) -> None:
        await wait_event(self._stopping, seconds)

    async def _retrying(self, action: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
        """Run `action` until it succeeds, with backoff, for as long as the drive is configured;
        None if the drive was stopped first."""
        retrying = AsyncRetrying(
            wait=connect_wait,
            retry=retry_if_exception_type(
                (
                    GraphError,
                    AuthError,
                    InvalidGraphResponse,
                    ConnectionLost,
                    OSError,
                    aiohttp.ClientError,
                    TimeoutError,
                )
            ),
            before_sleep=self._before_retry,
            sleep=self._pause,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._unless_stopped(action)
        return None  # pragma: no cover - tenacity either returns or raises above

    async def _unless_stopped(self, action: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
        """`action`'s result, or None if `stop()` cancelled it first. Its own task, so that
        stop() can cancel it alone. One short-lived task per attempt: a second one waiting on
        `_stopping` cost 23 MiB more at the peak of 10,000 attempts, and 7 MiB more after them."""
        if self._stopping.is_set():
            return None
        task: asyncio.Future[T] = asyncio.ensure_future(action())
        self._attempt = task
        try:
            return await task  # cancelling the watcher cancels the attempt too
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if task.cancelled() and self._stopping.is_set() and not (this and this.cancelling()):
                return None  # stop() cancelled the attempt; nobody cancelled the watcher
            raise
        finally:
            self._attempt = None

    def _before_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        if isinstance(error, GraphError) and error.not_supported:
            self.status.enter(DriveState.NOT_SUPPORTED, str(error))
            problem = "this drive cannot be watched over socketIo (Graph answered 400 notSupported)"
        elif isinstance(error, AuthError) and error.needs_login:
            self.status.enter(DriveState.NEEDS_LOGIN, str(error))
            problem = describe(error)
        else:
            self.status.enter(DriveState.RECONNECTING, describe(error))
            problem = describe(error)
        self.log.debug(
            "cannot connect, will retry",
            error=problem,
            retry_in=round(delay, 1),
            attempt=state.attempt_number,
        )
        self.check_health(self.outage.failed(time.monotonic(), problem))

    def check_health(self, report: Report | None = None) -> None:
        """Log `report`, or (called now and then) the recovery or a summary once one is due."""
        log_report(
            self.log, f"drive {self.drive.name}", report or self.outage.tick(time.monotonic())
        )

    async def _open(self, priority: Priority = Priority.CONNECT) -> _Connection:
        # The token is fetched before a connect slot is taken: an account whose token source
        # hangs must not hold slots that every other account's drives are waiting for.
        token = await self._tokens.token()
        try:
            return await self._open_with(token, priority=priority)
        except _TokenRefused:
            pass
        # Graph refused it (401): a fresh one, again outside the slot; refused twice is an error.
        return await self._open_with(
            await self._tokens.token(token), retry=False, priority=priority
        )

    async def _open_with(
        self, token: str, *, retry: bool = True, priority: Priority = Priority.CONNECT
    ) -> _Connection:
        async def bearer(refused: str | None) -> str:
            if refused is None:
                return token
            if retry:
                raise _TokenRefused
            raise AuthError(f"account {self.drive.account!r}: Graph refused a fresh token (401)")

        # The endpoint fetch is a Graph request: it waits for its tenant's turn (budget, pause)
        # outside the connect slot, so that a throttled tenant's drives never hold the slots
        # every other tenant's drives wait for. The slot paces the socket connects.
        subscription = await self._graph.socketio_endpoint(
            self.address,
            bearer,
            tenant=self.tenant,
            drive=self.drive.name,
            priority=priority,
        )
        self.status.endpoint = subscription.target.display
        self._warn_if_unencrypted(subscription)
        async with self._gate.slot():
            self._generation += 1
            connection = _Connection(self, subscription, self._generation)
            await connection.open()
        self.log.info(
            "connected",
            endpoint=subscription.target.display,
            namespace=subscription.target.namespace,
            expires=subscription.expires_at.isoformat() if subscription.expires_at else None,
        )
        return connection

    async def _renew(self, current: _Connection) -> _Connection:
        """Switch to a fresh endpoint, make before break; keep the old one if that fails."""
        async with asyncio.TaskGroup() as group:
            # The current socket is read meanwhile (its pongs and notifications go on): the
            # endpoint fetch waits for its tenant's turn, which may take longer than the
            # server waits for a pong. This task is the only one a drive adds, and only now.
            reading = group.create_task(
                current.relay(None), name=f"relayd-renewing-{self.drive.name}"
            )
            fresh = await self._try_renewal(current)
            if not reading.done():  # it ends by itself when the line is lost or relayd stops
                current.wake("renewed")  # back to reading in the drive's own task
        if fresh is None:
            return current
        self.status.renewals += 1
        await current.close(drain=True)
        self.log.info("endpoint renewed")
        self._connected("renewal")
        return fresh

    async def _try_renewal(self, current: _Connection) -> _Connection | None:
        try:
            # First in its tenant's line: a socket that is up stays up, even while thousands of
            # other drives wait for their first connect.
            return await self._open(Priority.RENEW)
        except Exception as error:
            expires = current.subscription.expires_at
            self.log.warning(
                "endpoint renewal failed, keeping the current connection", error=describe(error)
            )
            if expires is not None and datetime.now(UTC) >= expires:
                # Past its expiry the old socket may just have gone quiet: treat it as lost.
                current.mark_lost("endpoint expired and renewal failed")
            else:
                await self._pause(backoff_delay(2))
            return None

    _warned_unencrypted = False  # set on the instance once its drive has been warned about

    def _warn_if_unencrypted(self, subscription: Subscription) -> None:
        """Once per drive, not at every renewal: a plain http/ws notificationUrl off loopback."""
        if self._warned_unencrypted or not travels_unencrypted(subscription.target.display):
            return
        self._warned_unencrypted = True
        self.log.warning(
            "notificationUrl is not encrypted (plain http/ws to a host that is not loopback):"
            " the socket and its credential cross the network in clear text",
            endpoint=subscription.target.display,  # without the query: that is the credential
        )

    # -- notifications ----------------------------------------------------------------------------

    async def on_event(self, generation: int, payload: object) -> None:
        """A `notification` event arrived on the socket of the given generation."""
        received = time.time()
        try:
            items = parse_notification_event(payload)
        except MalformedNotification as exc:
            self.malformed(str(exc))
            return
        fresh = [item for item in items if not self._is_copy(item, generation, received)]
        if not fresh:
            return
        self.status.received += len(fresh)
        self.status.last_notification = received
        if self.feed is not None:
            self.feed.notified()
            return
        drive = self.drive
        await self.inbox.put(
            notification_deliveries(drive.name, drive.resource, drive.webhook, fresh, received)
        )

    def malformed(self, reason: str) -> None:
        self.status.malformed += 1
        self.log.warning("malformed notification ignored", reason=reason)

    def _is_copy(self, item: Mapping[str, Any], generation: int, now: float) -> bool:
        """True for a notification the other socket already brought during a switch-over.

        Only while two sockets overlap (and a short window after): at other times identical
        notifications are real, since one change often sends several.
        """
        if self._sockets >= 2:
            self._dedupe_until = now + DEDUPE_WINDOW
        if now > self._dedupe_until:
            self._recent.clear()
            return False
        while self._recent and next(iter(self._recent.values()))[1] < now - DEDUPE_WINDOW:
            self._recent.popitem(last=False)
        key = dedupe_key(item)
        seen = self._recent.get(key)
        if seen is not None and seen[0] != generation:
            self.status.duplicates += 1
            return True
        self._recent[key] = (generation, now)
        self._recent.move_to_end(key)
        return False

    def _socket_opened(self) -> None:
        self._sockets += 1

    def _socket_closed(self) -> None:
        """A socket closes while another stays (a switch-over): a notification both were sent
        may not have been read from either yet, since the close does not wait for the reads.
        The window for copies opens now, not at the first copy read while both were up."""
        if self._sockets >= 2:
            self._dedupe_until = time.time() + DEDUPE_WINDOW
        self._sockets -= 1

    async def _pump(self) -> None:
        """Move held notifications into the outbox, in order, batching what has piled up."""
        while True:
            deliveries = await self.inbox.take()
            try:
                await self._outbox.add(deliveries, fence=self.fence)
            except Fenced as exc:  # never retried: the drive is another replica's now
                self._lost_lease(exc)
                return
            except OutboxError as exc:
                # Nothing is dropped: the batch stays in the inbox, which fills; the socket waits.
                self._write_failed(exc)
                await asyncio.sleep(OUTBOX_RETRY)
                continue
            self.inbox.stored()
            if self._write_failing_since is not None:
                self.log.info(
                    "notifications are stored again",
                    after_seconds=round(time.monotonic() - self._write_failing_since, 1),
                )
                self._write_failing_since = None

    def _lost_lease(self, exc: Fenced) -> None:
        """A write was refused under our fence: stop at once (the socket closes); the
        supervisor then drops the drive, which the replica holding it now watches."""
        if not self.fenced:
            self.fenced = True
            self.log.warning(
                "another replica holds this drive now; stopping",
                error=str(exc),
                held=len(self.inbox),
            )
        self.stop()  # wakes the socket's read (relayd.push), which no event reaches otherwise

    def _write_failed(self, exc: OutboxError) -> None:
        """Said once per outage, not once a second: the outbox logs the cause itself."""
        if self._write_failing_since is None:
            self._write_failing_since = time.monotonic()
            self.log.error(
                "cannot store notifications; holding them, the socket waits when full",
                error=str(exc),
                held=len(self.inbox),
            )


class _TokenRefused(Exception):
    """Graph answered 401 to the token a connect started with."""


class _Connection:
    """One socket to one socketIo endpoint (relayd.push), read by the drive's own task."""

    def __init__(self, watcher: DriveWatcher, subscription: Subscription, generation: int) -> None:
        self.subscription = subscription
        self.generation = generation
        self.lost_reason: str | None = None
        self._watcher = watcher
        self._opened = time.monotonic()
        self._closed = False
        self._socket: PushSocket | None = None
        self._own_session: aiohttp.ClientSession | None = None  # without the supervisor's

    @property
    def age(self) -> float:
        return time.monotonic() - self._opened

    async def open(self) -> None:
        target = self.subscription.target
        watcher = self._watcher
        watcher._socket_opened()
        watcher._live.append(self)
        session = watcher._socket_session
        if session is None:
            session = self._own_session = aiohttp.ClientSession()
        options = {
            # A close handshake on a dead line waits this long before dropping the socket.
            "timeout": aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
            # No permessage-deflate: a Graph frame is a ping or a notification of a few hundred
            # bytes, and a zlib stream pair per socket costs memory and CPU on every frame.
            "compress": 0,
            **watcher._socket_options(target.server_url),
        }
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT * 2):
                self._socket = await PushSocket.connect(
                    session,
                    target.server_url,
                    target.namespace,
                    cap=cap_ping_times,
                    options=options,
                )
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Refused):
                raise ConnectionLost(f"socket refused: {exc}") from None
            if isinstance(exc, LineLost | ProtocolError):
                raise ConnectionLost(str(exc)) from None
            if isinstance(exc, aiohttp.ClientResponseError) and not isinstance(
                exc,
                aiohttp.ClientHttpProxyError,  # told apart by describe(), credential-free
            ):
                # Its text holds the URL, and the URL's query is the endpoint's credential.
                raise ConnectionLost(f"socket refused: HTTP {exc.status}") from None
            raise
        self._opened = time.monotonic()

    async def relay(self, seconds: float | None) -> str:
        """Read the socket: "lost", "stop", "renewed" (see wake) or "renew" once `seconds` have
        passed with the connection up (None: no deadline)."""
        socket = self._socket
        if self.lost_reason is not None or socket is None:
            return "lost"
        loop = asyncio.get_running_loop()
        socket.wake_at(None if seconds is None else loop.time() + seconds)
        try:
            woken = await socket.relay(self._on_frame)
        except LineLost as lost:
            self.mark_lost(str(lost))
            return "lost"
        if self.lost_reason is not None:
            return "lost"
        return "renew" if woken == "deadline" else woken

    def wake(self, reason: str) -> None:
        """End a `relay()` (now, or as soon as the event it is handing on is held)."""
        if self._socket is not None:
            self._socket.wake(reason)

    async def _on_frame(self, frame: Frame) -> None:
        if frame.kind == "malformed":
            self._watcher.malformed(str(frame.args[0]))
        elif frame.args[0] == "notification":  # other events are not Graph's: ignored
            payload = frame.args[1] if len(frame.args) > 1 else None
            await self._watcher.on_event(self.generation, payload)

    def mark_lost(self, reason: str) -> None:
        if self.lost_reason is None:
            self.lost_reason = reason
            self.wake("lost")

    async def close(self, *, drain: bool = False) -> None:
        """Close the socket. `drain` (a switch-over): first hand on what the server sent before
        it saw the leave; the fresh socket is not read meanwhile, so order holds, and what both
        sockets brought is dropped as a copy."""
        if self._closed:
            return
        self._closed = True
        self._watcher._socket_closed()
        self._watcher._live.remove(self)
        self.mark_lost("closed by relayd")
        if self._socket is not None:
            await self._socket.close(CLOSE_TIMEOUT * 2, self._on_frame if drain else None)
        if self._own_session is not None:
            await self._own_session.close()


def describe(error: BaseException | None) -> str:
    """An exception as one log-safe line (these never carry the endpoint's query)."""
    if error is None:
        return "unknown error"
    explained = describe_connection_error(error)  # TLS and proxy failures, naming the host
    if explained is not None:
        return explained
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
