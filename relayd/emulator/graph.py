"""An in-process fake of Microsoft Graph's socketIo change notifications, for tests and demos.

One aiohttp app on one port plays the parts of the real service a relay meets:

* Graph's "Get websocket endpoint" API (`GET /v1.0/.../root/subscriptions/socketIo`), which hands
  out a subscription whose notificationUrl names the push service,
* Graph's drive resources (`GET /me/drive`, `/groups/{id}/drive`, ...: each drive has an id, and
  `drives/{id}` is the same drive) and the listings `relayd discover` reads (followed and
  searched sites, their libraries, joined teams and groups), in pages, and
* the push service itself: a Socket.IO server (websocket transport only, as Graph) whose namespace
  is the notificationUrl's path and whose opaque query string is the credential.

Tests drive it directly (`emit`, `kick`, `expire`, `inject_error`, ...) or, when the relay runs in
another process, through a small control API under `/_emulator/`. `python -m relayd.emulator.graph`
runs it standalone. The protocol facts it imitates are in docs/graph-socketio.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import math
import secrets
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, TypeVar
from urllib.parse import parse_qs, urlencode

import engineio
import socketio
from aiohttp import web
from socketio.exceptions import ConnectionRefusedError as SocketIORefused

from relayd.emulator.delta import ChangeLog, InjectedDeltaError, answer_delta
from relayd.emulator.tls import LOOPBACK_NAMES, throwaway_ca
from relayd.waiting import wait_event

__all__ = ["EmulatedSite", "GraphEmulator", "GraphRequest", "main"]

UrlForm = Literal["notifications", "callback"]
ExpiryBehaviour = Literal["close", "quiet"]

NOTIFICATIONS_NAMESPACE: Final = "/notifications"
CALLBACK_NAMESPACE: Final = "/zbaehwg"

# Which query parameter carries the subscription's secret in each namespace.
_SECRET_PARAM: Final = {NOTIFICATIONS_NAMESPACE: "token", CALLBACK_NAMESPACE: "snthgk"}

# A socket that does not answer a graceful close within this long is cut by the web server.
_CLOSE_GRACE = 0.5

_UNSET: Final[Any] = object()

# Graph's own content type for OData answers: a relay must look at the media type only.
_GRAPH_JSON: Final = (
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;"
    "charset=utf-8"
)


def graph_time(moment: datetime) -> str:
    """Format a UTC time the way Graph does: RFC 3339, `Z`, trailing fraction zeros trimmed.

    Real answers carry a variable number of fraction digits ("...:50.88Z"), so relays must not
    parse with a fixed format; trimming here keeps them honest.
    """
    moment = moment.astimezone(UTC)
    fraction = f"{moment.microsecond // 1000:03d}".rstrip("0")
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _graph_error(
    status: int, code: str, message: str, *, retry_after: float | None = None
) -> web.Response:
    """Graph's JSON error body, innerError included, since relays must tolerate the extra keys."""
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": graph_time(datetime.now(UTC)),
                "request-id": str(uuid.uuid4()),
                "client-request-id": str(uuid.uuid4()),
            },
        }
    }
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
    return web.json_response(body, status=status, headers=headers)


@dataclass(eq=False)  # identity semantics: kept in sets
class _Subscription:
    id: str
    resource: str
    secret: str
    client_state: str
    namespace: str
    expires_at: datetime
    deadline: float  # time.monotonic() at expires_at: wall-clock jumps must not expire sockets
    expired: bool = False

    def is_expired(self) -> bool:
        return self.expired or time.monotonic() >= self.deadline


@dataclass
class _InjectedError:
    status: int
    code: str
    retry_after: float | None


@dataclass(frozen=True)
class GraphRequest:
    """One Graph API request as it reached the emulator (the request log)."""

    at: float  # time.monotonic() on arrival: the same clock relayd's budget runs on
    path: str
    resource: str  # as relayd's config writes it ("me", "drives/{id}", ...)
    token: str  # the bearer token as sent ("" without one)
    tenant: str | None  # the tenant the token belongs to (accept_token(..., tenant=...))


@dataclass
class _Throttle:
    status: int
    retry_after: float | None
    resource: str | None  # None: any resource
    tenant: str | None  # None: any tenant
    count: int


def _new_drive_id() -> str:
    # Business drive ids look like this: "b!" and URL-safe base64 (so "-" and "_" too).
    return f"b!{secrets.token_urlsafe(24)}"


@dataclass
class _Drive:
    resource: str  # the name it was first used under: what the counters are keyed by
    drive_id: str = field(default_factory=_new_drive_id)
    web_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str = "OneDrive"
    drive_type: str = "business"
    web_url: str = "https://emulator-my.sharepoint.com/personal/user_emulator_example"
    seq: int = 0
    errors: collections.deque[_InjectedError] = field(default_factory=collections.deque)
    lookup_errors: collections.deque[_InjectedError] = field(default_factory=collections.deque)
    subscriptions: list[_Subscription] = field(default_factory=list)
    changes: ChangeLog = field(default_factory=ChangeLog)

    def as_graph(self, base_url: str, select: str | None) -> dict[str, Any]:
        """The drive resource as Graph answers it, `$select` applied."""
        body: dict[str, Any] = {
            "id": self.drive_id,
            "name": self.name,
            "driveType": self.drive_type,
            "webUrl": self.web_url,
            "description": "",
        }
        if select:
            fields = {part.strip() for part in select.split(",")}
            body = {key: value for key, value in body.items() if key in fields}
        return {"@odata.context": f"{base_url}/$metadata#drives/$entity", **body}


@dataclass
class _Site:
    id: str
    name: str
    web_url: str
    libraries: list[_Drive]
    followed: bool
    forbidden: bool  # its /drives answers 403, as a site the user lost access to does

    def as_graph(self) -> dict[str, Any]:
        return {"id": self.id, "displayName": self.name, "name": self.name, "webUrl": self.web_url}


@dataclass
class _Group:
    id: str
    name: str
    team: bool
    unified: bool  # a Microsoft 365 group, which has a drive; a security group has none


@dataclass(frozen=True)
class EmulatedSite:
    """What `GraphEmulator.add_site` made: the site's id and its libraries' `drives/{id}`."""

    id: str
    drives: tuple[str, ...]


@dataclass
class _Connection:
    subscription: _Subscription
    namespace: str


class _EngineIOServer(engineio.AsyncServer):  # type: ignore[misc]
    """engineio's server with two fixes an emulator needs.

    * Every background task it starts (one per ping, the client monitor) is remembered, so
      `GraphEmulator.stop` can cancel what is left instead of leaving tasks for the loop to find.
    * engineio advertises `int(ping_interval) * 1000` ms in its OPEN packet (the int() is applied
      before the multiplication), so a fractional interval would be announced truncated, 0 for
      anything under a second. The OPEN packet still sits unsent in the socket's queue when the
      connect event fires, so the exact value is written into it there.
    * The same place can announce other ping times than the real ones (`announced_*`): a
      server that says "a ping a day" and then goes quiet, for relays to be tested against.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owned_tasks: set[asyncio.Task[Any]] = set()
        self.announced_ping_interval: float | None = None
        self.announced_ping_timeout: float | None = None

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = super().start_background_task(target, *args, **kwargs)
        self.owned_tasks.add(task)
        task.add_done_callback(self.owned_tasks.discard)
        return task

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "connect" and args:
            self._announce_exact_ping_interval(args[0])
        return await super()._trigger_event(event, *args, **kwargs)

    def _announce_exact_ping_interval(self, sid: str) -> None:
        sock = self.sockets.get(sid)
        pending = getattr(getattr(sock, "queue", None), "_queue", ())
        for pkt in pending:
            if pkt.packet_type == engineio.packet.OPEN and isinstance(pkt.data, dict):
                interval = self.announced_ping_interval or self.ping_interval
                pkt.data["pingInterval"] = round(interval * 1000)
                if self.announced_ping_timeout is not None:
                    pkt.data["pingTimeout"] = round(self.announced_ping_timeout * 1000)


class _SocketIOServer(socketio.AsyncServer):  # type: ignore[misc]
    def _engineio_server_class(self) -> type[_EngineIOServer]:
        return _EngineIOServer


class GraphEmulator:
    """Fake Graph socketIo endpoint plus push service; see the module docstring.

    Drives are keyed by the resource string relayd's config writes: "me", "drives/{id}",
    "groups/{id}", "users/{id}", "sites/{siteId}", "sites/{siteId}/lists/{listId}". Any id is
    accepted; a drive exists from its first use, gets a drive id then, and from then on
    `drives/{that id}` is the same drive (GET `/me/drive` tells it, as Graph's does). The
    counters (`endpoint_requests`, `connects`, ...) are keyed by the name a drive was first used
    under; the methods (`emit`, `connected`, ...) take any of its names.

    `me_not_supported` makes every `/me/drive/root/...` path answer 400 notSupported while
    `/drives/{id}/...` works, as some business tenants do. `add_site` and `add_group` give the
    signed-in user sites and groups for `relayd discover`; listings come in pages of
    `list_page_size`.

    `push_base_url` (an attribute too, read at each endpoint GET) sends clients elsewhere for the
    socket, e.g. to a proxy in front of this emulator, which can only be built once `port` is
    known: start the emulator, start the proxy, then set `push_base_url`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Iterable[str] = ("test-token",),
        lifetime: float = 3600.0,
        url_form: UrlForm = "notifications",
        expiry: ExpiryBehaviour = "close",
        ping_interval: float = 25.0,
        ping_timeout: float = 20.0,
        announced_ping_interval: float | None = None,
        announced_ping_timeout: float | None = None,
        push_base_url: str | None = None,
        me_not_supported: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: serve HTTPS and WSS with it (see relayd.emulator.tls); plain without."""
        if url_form not in ("notifications", "callback"):
            raise ValueError(f"url_form must be 'notifications' or 'callback', not {url_form!r}")
        if expiry not in ("close", "quiet"):
            raise ValueError(f"expiry must be 'close' or 'quiet', not {expiry!r}")
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
        if any(v is not None and v <= 0 for v in (announced_ping_interval, announced_ping_timeout)):
            raise ValueError("announced ping times must be positive")
        self.host = host
        self.port = port
        self.url_form: UrlForm = url_form
        self.expiry: ExpiryBehaviour = expiry
        self.push_base_url = push_base_url
        self.me_not_supported = me_not_supported
        self._ssl_context = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self._tokens = set(tokens)
        self._lifetime = float(lifetime)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        # What the OPEN packet says instead of the real times (None: the real ones), so a test
        # can meet a server that announces a huge interval while it pings at another.
        self._announced_ping = (announced_ping_interval, announced_ping_timeout)

        self.endpoint_requests: collections.Counter[str] = collections.Counter()
        self.connects: collections.Counter[str] = collections.Counter()
        # The most sockets a drive ever had open at once: 1 means no two clients (replicas)
        # ever watched it together; 2 only during a client's own make-before-break renewal.
        self.peak_connected: collections.Counter[str] = collections.Counter()
        self.emitted: dict[str, int] = {}
        self.delta_requests: collections.Counter[str] = collections.Counter()
        self.delta_page_size = 200
        self.requests: list[GraphRequest] = []  # every Graph API request, in arrival order
        self.token_tenants: dict[str, str] = {}
        self._throttles: list[_Throttle] = []
        # GET {resource}/drive (`me` -> /me/drive), keyed by the resource as the request wrote it.
        self.drive_lookups: collections.Counter[str] = collections.Counter()
        # Every Graph request by path (no query): which form of a drive's address was used.
        self.graph_paths: collections.Counter[str] = collections.Counter()
        self.list_page_size = 2  # small, so that every listing has pages to follow
        self._sites: list[_Site] = []
        self._groups: list[_Group] = []

        self._tenant_id = str(uuid.uuid4())
        self._drives: dict[str, _Drive] = {}
        self._by_secret: dict[str, _Subscription] = {}
        self._live: set[_Subscription] = set()  # not yet expired: what the expiry task watches
        self._conns: dict[str, _Connection] = {}  # Socket.IO sid -> its subscription
        # In-flight Engine.IO requests (a websocket is one long request), by aiohttp's task.
        self._eio_requests: dict[asyncio.Task[Any], web.Request] = {}
        self._emit_lock = asyncio.Lock()
        self._expiry_wake = asyncio.Event()
        self._expiry_task: asyncio.Task[None] | None = None
        self._sio: Any = None
        self._runner: web.AppRunner | None = None
        self._state: Literal["new", "running", "stopping", "stopped"] = "new"
        self._stopped = asyncio.Event()

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What a relay config puts in graph.base_url."""
        return f"{self.scheme}://{_netloc(self.host, self.port)}/v1.0"

    @property
    def push_base_url(self) -> str | None:
        """Where notificationUrls point instead of this server, or None."""
        return self._push_base_url

    @push_base_url.setter
    def push_base_url(self, url: str | None) -> None:
        self._push_base_url = url.rstrip("/") if url else None

    @property
    def push_url(self) -> str:
        """Scheme and authority of the notificationUrls handed out."""
        return self.push_base_url or f"{self.scheme}://{_netloc(self.host, self.port)}"

    async def start(self) -> None:
        """Bind and serve; after this `port` and `base_url` are valid."""
        if self._state != "new":
            raise RuntimeError("a GraphEmulator starts once")
        self._sio = _SocketIOServer(
            async_mode="aiohttp",
            transports=["websocket"],  # Graph refuses HTTP long-polling
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            logger=False,
            engineio_logger=False,
        )
        eio = self._sio.eio
        eio.announced_ping_interval, eio.announced_ping_timeout = self._announced_ping
        for namespace in (NOTIFICATIONS_NAMESPACE, CALLBACK_NAMESPACE):
            self._register_namespace(namespace)
        # A client that passes the notificationUrl as is joins "/" and, as with the real service,
        # is accepted and then hears nothing.
        self._sio.on("connect", handler=lambda sid, environ, auth: True, namespace="/")

        app = web.Application(middlewares=[self._graph_middleware])
        # Routed here rather than with sio.attach(app), so stop() can see the live websockets.
        app.router.add_route("*", "/socket.io/", self._engineio_request)
        self._add_graph_routes(app)
        self._add_control_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_CLOSE_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._expiry_task = asyncio.create_task(self._expire_when_due(), name="emulator-expiry")
        self._state = "running"

    async def stop(self) -> None:
        """Close every socket and the server; idempotent."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        if self._state == "stopping":  # a concurrent stop(): return when it is done
            await self._stopped.wait()
            return
        self._state = "stopping"
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
            self._expiry_task = None
        # All at once: a socket whose client vanished (kill -9) can cost the whole close grace,
        # and 2,000 of them one after another would cost 2,000 graces.
        async with asyncio.TaskGroup() as closing:
            for sid, conn in list(self._conns.items()):
                closing.create_task(self._close_socket(sid, conn))
        eio = self._sio.eio
        async with asyncio.TaskGroup() as closing:
            for eio_sid in list(eio.sockets):  # e.g. clients that joined "/" only
                closing.create_task(self._close_engineio(eio_sid))
        await self._await_websockets_closed()
        await self._sio.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # What engineio started and did not finish (pings sleeping out their interval).
        leftovers = list(eio.owned_tasks)
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        self._state = "stopped"
        self._stopped.set()

    async def __aenter__(self) -> GraphEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- knobs --------------------------------------------------------------------------------

    def accept_token(self, token: str, *, tenant: str | None = None) -> None:
        """Accept a bearer token; `tenant` is the tenant it belongs to (for the request log
        and `throttle`)."""
        self._tokens.add(token)
        if tenant is not None:
            self.token_tenants[token] = tenant

    def revoke_token(self, token: str) -> None:
        self._tokens.discard(token)

    def set_lifetime(self, seconds: float) -> None:
        """Lifetime of subscriptions created from now on; existing ones keep theirs."""
        self._lifetime = float(seconds)

    def inject_lookup_error(
        self,
        resource: str,
        status: int,
        code: str,
        *,
        retry_after: float | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next `count` GETs of the drive resource itself (`/me/drive`,
        `/groups/{id}/drive`, ...) with this Graph error; status 200 answers a body that is not
        JSON."""
        drive = self._drive(resource)
        for _ in range(count):
            drive.lookup_errors.append(_InjectedError(status, code, retry_after))

    def drive_id(self, resource: str) -> str:
        """The drive id behind any of a drive's names."""
        return self._drive(resource).drive_id

    # ---- what the user can find (`relayd discover`) -------------------------------------------

    def add_site(
        self,
        name: str,
        libraries: Sequence[str] = ("Documents",),
        *,
        followed: bool = True,
        forbidden: bool = False,
    ) -> EmulatedSite:
        """A SharePoint site with these document libraries, followed by the user or only found
        by search; `forbidden`: listing its libraries answers 403."""
        site_id = f"emulator.sharepoint.com,{uuid.uuid4()},{uuid.uuid4()}"
        web_url = f"https://emulator.sharepoint.com/sites/{name.replace(' ', '')}"
        drives = []
        for library in libraries:
            drive = self._drive(f"sites/{site_id}/lists/{uuid.uuid4()}")
            drive.name, drive.drive_type = library, "documentLibrary"
            drive.web_url = f"{web_url}/{library.replace(' ', '%20')}"
            drives.append(drive)
        self._sites.append(_Site(site_id, name, web_url, drives, followed, forbidden))
        return EmulatedSite(site_id, tuple(f"drives/{d.drive_id}" for d in drives))

    def add_group(self, name: str, *, team: bool = False, unified: bool = True) -> str:
        """A group the user is a member of (a team too with `team`); returns `groups/{id}`.
        A group that is not `unified` (a security group) has no drive."""
        group = _Group(str(uuid.uuid4()), name, team, unified)
        self._groups.append(group)
        resource = f"groups/{group.id}"
        if unified:
            drive = self._drive(resource)
            drive.name, drive.drive_type = "Documents", "documentLibrary"
            drive.web_url = (
                f"https://emulator.sharepoint.com/sites/{name.replace(' ', '')}/Shared%20Documents"
            )
        return resource

    def inject_error(
        self,
        resource: str,
        status: int,
        code: str,
        *,
        retry_after: float | None = None,
        count: int = 1,
    ) -> None:
        """Answer the drive's next `count` authorised endpoint GETs with this Graph error."""
        drive = self._drive(resource)
        for _ in range(count):
            drive.errors.append(_InjectedError(status, code, retry_after))

    def throttle(
        self,
        *,
        retry_after: float | None,
        status: int = 429,
        resource: str | None = None,
        tenant: str | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next `count` Graph requests (any route: endpoint, delta, anything under
        /v1.0/) of `resource` and/or `tenant` (None: any) with `status` and Retry-After."""
        self._throttles.append(_Throttle(status, retry_after, resource, tenant, count))

    def requests_of(self, tenant: str) -> list[GraphRequest]:
        return [request for request in self.requests if request.tenant == tenant]

    # ---- drive contents and delta -------------------------------------------------------------

    def change_log(self, resource: str) -> ChangeLog:
        """The drive's items and change history (delta tokens are positions in it)."""
        return self._drive(resource).changes

    async def change(
        self, resource: str, count: int = 1, *, delete: Iterable[str] = (), notify: int = 1
    ) -> list[str]:
        """Create `count` files and delete the given item ids, then send `notify` notifications
        (one change often sends several; 0 sends none). Returns the ids that changed."""
        changed = self._drive(resource).changes.change(count, delete=tuple(delete))
        if notify:
            await self.emit(resource, notify)
        return changed

    def inject_delta_error(
        self,
        resource: str,
        status: int,
        code: str,
        *,
        retry_after: float | None = None,
        location: str | None = None,
        count: int = 1,
    ) -> None:
        """Answer the drive's next `count` delta requests with this error (410 may carry a
        Location to restart from)."""
        errors = self._drive(resource).changes.errors
        for _ in range(count):
            errors.append(InjectedDeltaError(status, code, retry_after, location))

    def hold_delta(self, resource: str) -> asyncio.Event:
        """The drive's next delta page is sent half-way, then waits until the event is set."""
        release = asyncio.Event()
        self._drive(resource).changes.hold = release
        return release

    # ---- events -------------------------------------------------------------------------------

    async def emit(self, resource: str, count: int = 1, *, raw: Any = _UNSET) -> int:
        """Send `count` notifications to every live, unexpired socket of the drive, in order.

        Each bumps the drive's sequence number (`relaydEmulatorSeq` in the item, `emitted[...]`),
        whether or not a socket hears it. With `raw`, that exact value is sent once instead, and
        no sequence number is used. Returns the number of deliveries: sockets reached, summed over
        the notifications sent.
        """
        drive = self._drive(resource)
        reached = 0
        async with self._emit_lock:  # concurrent callers must not interleave sequence numbers
            if raw is not _UNSET:
                return await self._send(drive, lambda _sub: raw)
            for _ in range(count):
                drive.seq += 1
                self.emitted[drive.resource] = drive.seq
                payload = functools.partial(self._payload, drive, seq=drive.seq)
                reached += await self._send(drive, payload)
        return reached

    async def kick(self, resource: str) -> int:
        """Disconnect, server side, every live socket of the drive; returns how many."""
        name = self._drive(resource).resource
        victims = [(s, c) for s, c in self._conns.items() if c.subscription.resource == name]
        for sid, conn in victims:
            await self._close_socket(sid, conn)
        return len(victims)

    async def expire(self, resource: str) -> None:
        """Every current subscription of the drive expires now (see `expiry` for what follows)."""
        for sub in list(self._drive(resource).subscriptions):
            if not sub.expired:
                await self._expire_subscription(sub)

    def connected(self, resource: str, *, include_expired: bool = True) -> int:
        """Live sockets of the drive now; with include_expired=False, only unexpired ones."""
        name = self._drive(resource).resource
        return sum(
            1
            for conn in self._conns.values()
            if conn.subscription.resource == name
            and (include_expired or not conn.subscription.is_expired())
        )

    def issued_secrets(self) -> list[str]:
        """Every subscription secret handed out so far, oldest first: for "never logged" checks."""
        return list(self._by_secret)

    def state(self) -> dict[str, dict[str, int]]:
        """Per-drive counters, as the control API's `GET /_emulator/state` returns them."""
        names = (
            {drive.resource for drive in self._drives.values()}  # not their drives/{id} aliases
            | set(self.endpoint_requests)
            | set(self.connects)
            | set(self.emitted)
        )
        return {
            name: {
                "connected": self.connected(name),
                "endpoint_requests": self.endpoint_requests[name],
                "connects": self.connects[name],
                "peak_connected": self.peak_connected[name],
                "emitted": self.emitted.get(name, 0),
                "drive_lookups": self.drive_lookups[name],
            }
            for name in sorted(names)
        }

    # ---- internals: subscriptions -------------------------------------------------------------

    def _drive(self, resource: str) -> _Drive:
        """The drive any of its names means; a new one for a name never used."""
        drive = self._drives.get(resource)
        if drive is None:
            kind, _, rest = resource.partition("/")
            drive = _Drive(resource)
            if kind == "drives" and rest:
                drive.drive_id = rest
            drive.changes.drive_id = drive.drive_id
            self._drives[resource] = drive
            self._drives.setdefault(f"drives/{drive.drive_id}", drive)
        return drive

    def _new_subscription(self, drive: _Drive) -> tuple[_Subscription, str]:
        secret = secrets.token_urlsafe(32)
        callback = self.url_form == "callback"
        sub = _Subscription(
            id=str(uuid.uuid4()),
            resource=drive.resource,
            secret=secret,
            client_state=f"system-managed:{str(uuid.uuid4()).upper()}",
            namespace=CALLBACK_NAMESPACE if callback else NOTIFICATIONS_NAMESPACE,
            expires_at=datetime.now(UTC) + timedelta(seconds=self._lifetime),
            deadline=time.monotonic() + self._lifetime,
        )
        drive.subscriptions.append(sub)
        self._by_secret[secret] = sub
        self._live.add(sub)
        self._expiry_wake.set()
        if callback:
            url = f"{self.push_url}/zbaehwg/callback?snthgk={secret}"
        else:
            url = f"{self.push_url}/notifications?token={secret}&applicationId={uuid.uuid4()}"
        return sub, url

    async def _expire_subscription(self, sub: _Subscription) -> None:
        sub.expired = True
        self._live.discard(sub)
        if self.expiry == "close":
            for sid, conn in list(self._conns.items()):
                if conn.subscription is sub:
                    await self._close_socket(sid, conn)

    async def _expire_when_due(self) -> None:
        """Expire subscriptions as their expirationDateTime passes, so short lifetimes are real."""
        while True:
            # Clear before looking, so a subscription created while we work wakes the next wait.
            self._expiry_wake.clear()
            now = time.monotonic()
            for sub in sorted(self._live, key=lambda s: s.deadline):
                if sub.deadline <= now:
                    await self._expire_subscription(sub)
            next_deadline = min((s.deadline for s in self._live), default=None)
            timeout = None if next_deadline is None else max(0.0, next_deadline - time.monotonic())
            await wait_event(self._expiry_wake, timeout)

    # ---- internals: sockets -------------------------------------------------------------------

    def _register_namespace(self, namespace: str) -> None:
        async def on_connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
            self._accept(sid, namespace, environ)

        async def on_disconnect(sid: str, reason: Any = None) -> None:
            self._conns.pop(sid, None)

        self._sio.on("connect", handler=on_connect, namespace=namespace)
        self._sio.on("disconnect", handler=on_disconnect, namespace=namespace)

    def _accept(self, sid: str, namespace: str, environ: dict[str, Any]) -> None:
        if self._state != "running":
            raise SocketIORefused("shutting down")
        # The query string of the Engine.IO handshake is where Graph's opaque credential travels.
        query = parse_qs(environ.get("QUERY_STRING", ""))
        values = query.get(_SECRET_PARAM[namespace], [])
        sub = self._by_secret.get(values[0]) if values else None
        if sub is None or sub.namespace != namespace:
            raise SocketIORefused("unknown subscription")
        if self.expiry == "close" and sub.is_expired():
            raise SocketIORefused("subscription expired")
        self._conns[sid] = _Connection(sub, namespace)
        self.connects[sub.resource] += 1
        now = self.connected(sub.resource)
        if now > self.peak_connected[sub.resource]:
            self.peak_connected[sub.resource] = now

    def _payload(self, drive: _Drive, sub: _Subscription, seq: int) -> str:
        item = {
            "subscriptionId": sub.id,
            "clientState": sub.client_state,
            "expirationDateTime": graph_time(sub.expires_at),
            "resource": drive.drive_id,
            "tenantId": self._tenant_id,
            "siteUrl": "/personal/emulator",
            "webId": drive.web_id,
            "relaydEmulatorSeq": seq,
        }
        # Graph sends the payload as a JSON *string*, to be parsed a second time.
        return json.dumps({"value": [item]})

    async def _send(self, drive: _Drive, make: Callable[[_Subscription], Any]) -> int:
        reached = 0
        for sid, conn in list(self._conns.items()):
            sub = conn.subscription
            if sub.resource != drive.resource or sub.is_expired():
                continue
            await self._sio.emit("notification", make(sub), to=sid, namespace=conn.namespace)
            reached += 1
        return reached

    async def _close_socket(self, sid: str, conn: _Connection) -> None:
        """Namespace disconnect (`41`), then close the Engine.IO socket too.

        A python-socketio client drops the connection on `41` by itself; closing the transport as
        well means any client, however it treats `41`, sees the disconnect.
        """
        eio_sid = self._sio.manager.eio_sid_from_sid(sid, conn.namespace)
        await self._sio.disconnect(sid, namespace=conn.namespace)
        self._conns.pop(sid, None)
        if eio_sid is not None:
            await self._close_engineio(eio_sid)

    async def _await_websockets_closed(self) -> None:
        """Let clients answer the close, then cut whoever has not.

        Once aiohttp's shutdown starts it drops incoming bytes, so a client's closing handshake
        must be over before `runner.cleanup()`, or each socket costs the full shutdown timeout.
        """
        if self._eio_requests:
            await asyncio.wait(list(self._eio_requests), timeout=_CLOSE_GRACE)
        for request in list(self._eio_requests.values()):
            if request.transport is not None:
                request.transport.abort()  # a frozen or vanished client: no handshake to wait for
        if self._eio_requests:
            await asyncio.wait(list(self._eio_requests), timeout=_CLOSE_GRACE)

    async def _engineio_request(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._eio_requests[task] = request
        try:
            response: web.StreamResponse = await self._sio.handle_request(request)
            return response
        finally:
            del self._eio_requests[task]

    async def _close_engineio(self, eio_sid: str) -> None:
        # engineio's close waits for its queue to drain; a client that stopped reading (a frozen
        # proxy) must not hang us, so give up after a grace period: the web server cuts it later.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE):
                await self._sio.eio.disconnect(eio_sid)

    # ---- internals: HTTP ----------------------------------------------------------------------

    def _add_graph_routes(self, app: web.Application) -> None:
        drive_paths = (
            "/v1.0/me/drive",
            "/v1.0/drives/{drive_id}",
            "/v1.0/groups/{group_id}/drive",
            "/v1.0/users/{user_id}/drive",
            "/v1.0/sites/{site_id}/drive",
            "/v1.0/sites/{site_id}/lists/{list_id}/drive",
        )
        for tail, handler in (
            ("", self._drive_resource),
            ("/root/subscriptions/socketIo", self._socketio_endpoint),
            ("/root/delta", self._delta),
        ):
            for path in drive_paths:
                app.router.add_get(f"{path}{tail}", handler)
        app.router.add_get("/v1.0/me/followedSites", self._followed_sites)
        app.router.add_get("/v1.0/sites", self._search_sites)
        app.router.add_get("/v1.0/sites/{site_id}/drives", self._site_drives)
        app.router.add_get("/v1.0/me/joinedTeams", self._joined_teams)
        app.router.add_get("/v1.0/me/memberOf/microsoft.graph.group", self._member_of)

    @staticmethod
    def _resource_of(request: web.Request) -> tuple[str, str]:
        """The drive's resource as relayd's config writes it, and its Graph path."""
        match = request.match_info
        if "list_id" in match:
            resource = f"sites/{match['site_id']}/lists/{match['list_id']}"
            return resource, f"{resource}/drive"
        for key, kind in (("site_id", "sites"), ("group_id", "groups"), ("user_id", "users")):
            if key in match:
                resource = f"{kind}/{match[key]}"
                return resource, f"{resource}/drive"
        if "drive_id" in match:
            resource = f"drives/{match['drive_id']}"
            return resource, resource
        return "me", "me/drive"

    @web.middleware
    async def _graph_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        """Log every Graph API request, and answer the injected throttles."""
        if not request.path.startswith("/v1.0/"):
            response: web.StreamResponse = await handler(request)
            return response
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        tenant = self.token_tenants.get(token)
        unrouted = getattr(request.match_info, "http_exception", None) is not None
        resource = "" if unrouted else self._resource_of(request)[0]
        self.requests.append(GraphRequest(time.monotonic(), request.path, resource, token, tenant))
        for throttle in self._throttles:
            if throttle.resource not in (None, resource) or throttle.tenant not in (None, tenant):
                continue
            throttle.count -= 1
            if throttle.count <= 0:
                self._throttles.remove(throttle)
            return _graph_error(
                throttle.status,
                "activityLimitReached" if throttle.status == 429 else "serviceNotAvailable",
                "Injected throttle.",
                retry_after=throttle.retry_after,
            )
        response = await handler(request)
        return response

    def _refuse_me(self, request: web.Request) -> web.Response | None:
        """What some business tenants answer on /me/drive/root/... (abraunegg/onedrive #3637)."""
        if self.me_not_supported and request.path.startswith("/v1.0/me/drive/root/"):
            return _graph_error(
                400, "notSupported", "Operation not supported for this drive addressing."
            )
        return None

    async def _drive_resource(self, request: web.Request) -> web.Response:
        """GET {resource}/drive: the drive itself, its id above all."""
        resource, _ = self._resource_of(request)
        self.graph_paths[request.path] += 1
        self.drive_lookups[resource] += 1
        refused = self._refuse_bearer(request)
        if refused is not None:
            return refused
        if resource.startswith("groups/") and any(
            g.id == resource.partition("/")[2] and not g.unified for g in self._groups
        ):
            return _graph_error(404, "itemNotFound", "The group has no drive.")
        drive = self._drive(resource)
        if drive.lookup_errors:
            err = drive.lookup_errors.popleft()
            if err.status == 200:
                return web.Response(text="<html>a captive portal</html>", content_type="text/html")
            return _graph_error(
                err.status, err.code, "Injected by the emulator.", retry_after=err.retry_after
            )
        return web.Response(
            text=json.dumps(drive.as_graph(self.base_url, request.query.get("$select"))),
            headers={"Content-Type": _GRAPH_JSON},
        )

    def _listing(self, request: web.Request, items: list[dict[str, Any]]) -> web.Response:
        """One page of a collection, `@odata.nextLink` to the next (`$skiptoken` an offset)."""
        try:
            offset = int(request.query.get("$skiptoken", "0"))
        except ValueError:
            return _graph_error(400, "invalidRequest", "Invalid skip token.")
        size = max(1, self.list_page_size)
        body: dict[str, Any] = {
            "@odata.context": f"{self.base_url}/$metadata#collection",
            "value": items[offset : offset + size],
        }
        if offset + size < len(items):
            query = {k: v for k, v in request.query.items() if k != "$skiptoken"}
            query["$skiptoken"] = str(offset + size)
            body["@odata.nextLink"] = f"{self.base_url}{request.path[5:]}?{urlencode(query)}"
        return web.Response(text=json.dumps(body), headers={"Content-Type": _GRAPH_JSON})

    def _listed(self, request: web.Request) -> web.Response | None:
        self.graph_paths[request.path] += 1
        return self._refuse_bearer(request)

    async def _followed_sites(self, request: web.Request) -> web.Response:
        refused = self._listed(request)
        if refused is not None:
            return refused
        return self._listing(request, [s.as_graph() for s in self._sites if s.followed])

    async def _search_sites(self, request: web.Request) -> web.Response:
        refused = self._listed(request)
        if refused is not None:
            return refused
        text = request.query.get("search")
        if text is None:
            return _graph_error(400, "invalidRequest", "Only ?search= is supported here.")
        text = text.strip().lower()
        found = [s for s in self._sites if text in ("", "*") or text in s.name.lower()]
        return self._listing(request, [s.as_graph() for s in found])

    async def _site_drives(self, request: web.Request) -> web.Response:
        refused = self._listed(request)
        if refused is not None:
            return refused
        site = next((s for s in self._sites if s.id == request.match_info["site_id"]), None)
        if site is None:
            return _graph_error(404, "itemNotFound", "Site not found.")
        if site.forbidden:
            return _graph_error(403, "accessDenied", "Access denied.")
        return self._listing(
            request, [drive.as_graph(self.base_url, None) for drive in site.libraries]
        )

    async def _joined_teams(self, request: web.Request) -> web.Response:
        refused = self._listed(request)
        if refused is not None:
            return refused
        teams = [
            {"id": g.id, "displayName": g.name, "description": ""} for g in self._groups if g.team
        ]
        return self._listing(request, teams)

    async def _member_of(self, request: web.Request) -> web.Response:
        refused = self._listed(request)
        if refused is not None:
            return refused
        groups = [
            {
                "id": g.id,
                "displayName": g.name,
                "groupTypes": ["Unified"] if g.unified else [],
                "mailEnabled": g.unified,
                "securityEnabled": not g.unified,
            }
            for g in self._groups
        ]
        return self._listing(request, groups)

    def _refuse_bearer(self, request: web.Request) -> web.Response | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _graph_error(401, "InvalidAuthenticationToken", "Access token is empty.")
        if token.strip() not in self._tokens:
            return _graph_error(
                401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed."
            )
        return None

    async def _delta(self, request: web.Request) -> web.StreamResponse:
        resource, path = self._resource_of(request)
        drive = self._drive(resource)
        self.delta_requests[drive.resource] += 1
        self.graph_paths[request.path] += 1
        refused = self._refuse_bearer(request) or self._refuse_me(request)
        if refused is not None:
            return refused
        return await answer_delta(
            request,
            drive.changes,
            base_url=self.base_url,
            path=path,
            page_size=self.delta_page_size,
        )

    async def _socketio_endpoint(self, request: web.Request) -> web.Response:
        resource, _ = self._resource_of(request)
        drive = self._drive(resource)
        self.endpoint_requests[drive.resource] += 1
        self.graph_paths[request.path] += 1

        refused = self._refuse_bearer(request) or self._refuse_me(request)
        if refused is not None:
            return refused
        if drive.errors:
            err = drive.errors.popleft()
            return _graph_error(
                err.status, err.code, "Injected by the emulator.", retry_after=err.retry_after
            )

        sub, url = self._new_subscription(drive)
        body = {
            "@odata.context": f"{self.base_url}/$metadata#subscriptions/$entity",
            "clientState": sub.client_state,
            "expirationDateTime": graph_time(sub.expires_at),
            "id": sub.id,
            "notificationUrl": url,
        }
        return web.Response(
            text=json.dumps(body),
            headers={"Content-Type": _GRAPH_JSON, "request-id": str(uuid.uuid4())},
        )

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_post("/_emulator/emit", self._control_emit)
        app.router.add_post("/_emulator/kick", self._control_kick)
        app.router.add_post("/_emulator/expire", self._control_expire)
        app.router.add_post("/_emulator/error", self._control_error)
        app.router.add_post("/_emulator/lifetime", self._control_lifetime)
        app.router.add_get("/_emulator/state", self._control_state)
        app.router.add_post("/_emulator/change", self._control_change)
        app.router.add_post("/_emulator/site", self._control_site)
        app.router.add_post("/_emulator/group", self._control_group)

    async def _control_site(self, request: web.Request) -> web.Response:
        name = request.query.get("name")
        if not name:
            raise web.HTTPBadRequest(text="missing ?name=")
        libraries = [p.strip() for p in request.query.get("libraries", "Documents").split(",")]
        site = self.add_site(
            name,
            [library for library in libraries if library],
            followed=request.query.get("followed", "1") != "0",
            forbidden=request.query.get("forbidden", "0") != "0",
        )
        return web.json_response({"id": site.id, "drives": list(site.drives)})

    async def _control_group(self, request: web.Request) -> web.Response:
        name = request.query.get("name")
        if not name:
            raise web.HTTPBadRequest(text="missing ?name=")
        resource = self.add_group(
            name,
            team=request.query.get("team", "0") != "0",
            unified=request.query.get("unified", "1") != "0",
        )
        return web.json_response({"resource": resource, "drive_id": self.drive_id(resource)})

    async def _control_change(self, request: web.Request) -> web.Response:
        changed = await self.change(
            _query_resource(request),
            _query_number(request, "count", int, 1),
            notify=_query_number(request, "notify", int, 1),
        )
        return web.json_response({"changed": changed})

    async def _control_emit(self, request: web.Request) -> web.Response:
        resource = _query_resource(request)
        count = _query_number(request, "count", int, 1)
        return web.json_response({"reached": await self.emit(resource, count)})

    async def _control_kick(self, request: web.Request) -> web.Response:
        return web.json_response({"kicked": await self.kick(_query_resource(request))})

    async def _control_expire(self, request: web.Request) -> web.Response:
        await self.expire(_query_resource(request))
        return web.json_response({})

    async def _control_error(self, request: web.Request) -> web.Response:
        retry_after = request.query.get("retry_after")
        self.inject_error(
            _query_resource(request),
            _query_number(request, "status", int, None),
            request.query.get("code", "serviceNotAvailable"),
            retry_after=float(retry_after) if retry_after is not None else None,
            count=_query_number(request, "count", int, 1),
        )
        return web.json_response({})

    async def _control_lifetime(self, request: web.Request) -> web.Response:
        self.set_lifetime(_query_number(request, "seconds", float, None))
        return web.json_response({})

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())


def _query_resource(request: web.Request) -> str:
    resource = request.query.get("resource")
    if not resource:
        raise web.HTTPBadRequest(text="missing ?resource=")
    return resource


_N = TypeVar("_N", int, float)


def _query_number(request: web.Request, name: str, kind: type[_N], default: _N | None) -> _N:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(text=f"missing ?{name}=")
        return default
    try:
        return kind(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"?{name}= must be a number") from None


# ---- standalone -------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def build_parser(prog: str = "python -m relayd.emulator.graph") -> argparse.ArgumentParser:
    """The emulator's command line; docs/emulator.md describes its control API."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the Graph socketIo emulator until SIGINT or SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=0, help="port to listen on (default 0: any free one, printed)"
    )
    parser.add_argument(
        "--token",
        action="append",
        dest="tokens",
        help="accepted bearer token (repeatable; default: test-token)",
    )
    parser.add_argument(
        "--lifetime",
        type=float,
        default=3600.0,
        help="seconds a socketIo endpoint lives before it expires (default 3600)",
    )
    parser.add_argument(
        "--url-form",
        choices=("notifications", "callback"),
        default="notifications",
        help="the notificationUrl's shape: /notifications?token=... (default) or the older"
        " /callback?snthgk=... form",
    )
    parser.add_argument(
        "--expiry",
        choices=("close", "quiet"),
        default="close",
        help="what an expired endpoint does: close its sockets (default) or go quiet, sending"
        " nothing while staying open",
    )
    parser.add_argument(
        "--ping-interval", type=float, default=25.0, help="Engine.IO ping interval, s (25)"
    )
    parser.add_argument(
        "--ping-timeout", type=float, default=20.0, help="Engine.IO ping timeout, s (20)"
    )
    parser.add_argument(
        "--announced-ping-interval",
        type=float,
        default=None,
        help="what the OPEN packet announces instead of --ping-interval",
    )
    parser.add_argument(
        "--announced-ping-timeout",
        type=float,
        default=None,
        help="what the OPEN packet announces instead of --ping-timeout",
    )
    parser.add_argument(
        "--push-base-url",
        default=None,
        help="scheme://host:port the notificationUrls point at instead of this server (a proxy"
        " in between, say)",
    )
    parser.add_argument(
        "--me-not-supported",
        action="store_true",
        help="answer /me/drive/root/... with 400 notSupported, as some business tenants do",
    )
    parser.add_argument(
        "--tls-ca-out",
        type=Path,
        default=None,
        metavar="PATH",
        help="serve HTTPS/WSS with a certificate from a throwaway CA (needs trustme) and write"
        " that CA's certificate to PATH, for relayd's tls.ca_file",
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # the handler only signals; the loop shuts down
    context = None
    if args.tls_ca_out is not None:
        authority = throwaway_ca(sorted({*LOOPBACK_NAMES, args.host}))
        authority.write_ca(args.tls_ca_out)
        context = authority.server_context
    emulator = GraphEmulator(
        ssl_context=context,
        host=args.host,
        port=args.port,
        tokens=args.tokens or ("test-token",),
        lifetime=args.lifetime,
        url_form=args.url_form,
        expiry=args.expiry,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        announced_ping_interval=args.announced_ping_interval,
        announced_ping_timeout=args.announced_ping_timeout,
        push_base_url=args.push_base_url,
        me_not_supported=args.me_not_supported,
    )
    async with emulator:
        print(f"listening {emulator.base_url}", flush=True)
        await stop.wait()


def main(
    argv: Sequence[str] | None = None, *, prog: str = "python -m relayd.emulator.graph"
) -> int:
    asyncio.run(_serve(_parse_args(argv, prog)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
