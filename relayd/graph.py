"""Microsoft Graph's socketIo endpoint: what it answers, how to read it, how to ask for it.

The pure half (no I/O) turns Graph's answers into typed values: the subscription, the Socket.IO
target hidden in its notificationUrl, the notification event's JSON-string payload, and Graph's JSON
error bodies. The I/O half is `GraphClient.socketio_endpoint`, one authenticated GET.

The protocol facts behind every choice here are in docs/graph-socketio.md.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from relayd.config import resource_path
from relayd.tenant import DEFAULT_TENANT, WINDOW, Priority, TenantGate, TenantReport

# A notification is a few hundred bytes. Anything far larger is not one, and parsing it would
# only let a broken or hostile peer spend our memory.
MAX_EVENT_BYTES = 256 * 1024
# A notification nests three deep ({"value": [{...}]}), a few more with unknown fields. A deeper
# document is not one, and everything after the parser (json.dumps of the item into a webhook
# body, the duplicate key) recurses over it: capped here, nothing after the parser can hit the
# recursion limit (about 1,000, less the frames already on the stack).
MAX_EVENT_DEPTH = 32


@dataclass(frozen=True)
class SocketTarget:
    """Where to connect for one notificationUrl.

    Graph's notificationUrl is not an Engine.IO URL: its path is the Socket.IO namespace and its
    query string is an opaque credential that must reach the server unchanged.
    """

    server_url: str  # scheme://host[:port]?query, what python-socketio's connect() takes
    namespace: str
    display: str  # scheme://host/path with the query hidden: safe to log

    def __repr__(self) -> str:  # the query is a credential; keep it out of reprs and tracebacks
        return f"SocketTarget({self.display!r}, namespace={self.namespace!r})"


@dataclass(frozen=True)
class Subscription:
    """A socketIo endpoint handed out by Graph."""

    id: str
    target: SocketTarget
    expires_at: datetime | None  # absent in Graph's docs, present in real answers


class InvalidGraphResponse(ValueError):
    """Graph answered 2xx with something that is not a usable subscription."""


class MalformedNotification(ValueError):
    """A `notification` event whose payload is not what Graph sends."""


class GraphError(Exception):
    """Graph answered a request with an error status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        location: str | None = None,
    ) -> None:
        super().__init__(f"Graph answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.location = location  # where a 410 on a delta query says to start again

    @property
    def not_supported(self) -> bool:
        """The drive cannot be watched over socketIo (seen on some business tenants)."""
        return self.status == 400 and self.code.lower() == "notsupported"

    @property
    def throttled(self) -> bool:
        return self.status in (429, 503)

    @property
    def unauthorized(self) -> bool:
        return self.status == 401


class DriveLookupError(GraphError):
    """Graph refused to say which drive a resource (`me`, `groups/{id}`, ...) is.

    Still a GraphError with the same status, code and Retry-After, so it is retried (and
    throttled) like any other; only its message names the drive and its resource."""

    def __init__(self, drive: str, resource: str, error: GraphError) -> None:
        super().__init__(
            error.status,
            error.code,
            error.message,
            retry_after=error.retry_after,
            location=error.location,
        )
        self.args = (f"drive {drive!r}: cannot look up the drive id of {resource!r}: {error}",)


def parse_drive_id(body: object) -> str:
    """The `id` of a drive resource (`GET .../drive?$select=id`); pure."""
    if not isinstance(body, Mapping):
        raise InvalidGraphResponse("drive answer is not a JSON object")
    drive_id = body.get("id")
    # The id goes into every later URL path: nothing that could cut or walk the path.
    if (
        not isinstance(drive_id, str)
        or not drive_id
        or drive_id in (".", "..")
        or any(char.isspace() or char in "/?#%" for char in drive_id)
    ):
        raise InvalidGraphResponse("drive answer has no usable 'id'")
    return drive_id


def parse_notification_url(url: str) -> SocketTarget:
    """Split a notificationUrl into the Engine.IO server URL and the Socket.IO namespace.

    Two forms are in use: `https://HOST/notifications?token=...` (namespace `/notifications`) and
    the older documented `https://HOST/zbaehwg/callback?snthgk=...` (namespace `/zbaehwg`).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise InvalidGraphResponse("notificationUrl is not an absolute http(s) URL")
    path = parts.path.rstrip("/")
    if path.endswith("/callback"):
        path = path[: -len("/callback")]
    if not path:
        raise InvalidGraphResponse("notificationUrl has no path, so no Socket.IO namespace")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    server_url = f"{scheme}://{parts.netloc}"
    if parts.query:
        server_url += f"?{parts.query}"
    return SocketTarget(
        server_url=server_url, namespace=path, display=f"{scheme}://{parts.netloc}{parts.path}"
    )


def parse_timestamp(value: str) -> datetime:
    """Parse Graph's RFC 3339 timestamps (`2025-12-24T03:32:50.88Z`, up to 7 fraction digits)."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python before 3.11 accepted only 3 or 6 fraction digits; Graph sends 2 to 7. Normalise to 6.
    head, sep, tail = text.partition(".")
    if sep:
        digits = len(tail) - len(tail.lstrip("0123456789"))
        tail = (tail[:digits] + "000000")[:6] + tail[digits:]
        text = f"{head}.{tail}"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_subscription(body: object) -> Subscription:
    """Read the socketIo endpoint's JSON answer."""
    if not isinstance(body, Mapping):
        raise InvalidGraphResponse("socketIo endpoint answer is not a JSON object")
    url = body.get("notificationUrl")
    if not isinstance(url, str) or not url:
        raise InvalidGraphResponse("socketIo endpoint answer has no notificationUrl")
    sub_id = body.get("id")
    expires_at = None
    expiry = body.get("expirationDateTime")
    if isinstance(expiry, str):
        try:
            expires_at = parse_timestamp(expiry)
        except ValueError as exc:
            raise InvalidGraphResponse(f"expirationDateTime {expiry!r} is not a timestamp") from exc
    return Subscription(
        id=sub_id if isinstance(sub_id, str) else "",
        target=parse_notification_url(url),
        expires_at=expires_at,
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def parse_graph_error(status: int, body: bytes, headers: Mapping[str, str]) -> GraphError:
    """Graph's errors are `{"error": {"code": ..., "message": ...}}`; proxies send anything."""
    code, message = "unknown", body[:200].decode("utf-8", "replace").strip() or "no body"
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or "")
    return GraphError(
        status,
        code,
        message,
        retry_after=parse_retry_after(headers.get("Retry-After")),
        location=headers.get("Location"),
    )


def parse_notification_event(payload: object) -> list[dict[str, Any]]:
    """Read a `notification` event's argument: a JSON *string* holding `{"value": [item, ...]}`.

    Items are returned exactly as received (unknown fields included). Anything else raises
    MalformedNotification saying what was wrong, never echoing the payload itself.
    """
    if isinstance(payload, bytes | bytearray):
        payload = bytes(payload).decode("utf-8", "replace")
    if not isinstance(payload, str):
        raise MalformedNotification(
            f"argument is of type {type(payload).__name__}, expected a JSON string"
        )
    if len(payload) > MAX_EVENT_BYTES:
        raise MalformedNotification(
            f"argument is {len(payload)} characters, over {MAX_EVENT_BYTES}"
        )
    try:
        document = json.loads(payload)
        too_deep = _nests_deeper_than(document, MAX_EVENT_DEPTH)
    except json.JSONDecodeError as exc:
        raise MalformedNotification(f"argument is not JSON ({exc.msg} at {exc.pos})") from None
    except RecursionError:
        # The C parser counts its nesting against the recursion limit and unwinds cleanly.
        too_deep = True
    if too_deep:
        raise MalformedNotification(f"JSON is nested too deeply (over {MAX_EVENT_DEPTH} levels)")
    if not isinstance(document, dict) or "value" not in document:
        raise MalformedNotification("JSON has no 'value' member")
    items = document["value"]
    if not isinstance(items, list):
        raise MalformedNotification("'value' is not a list")
    if not all(isinstance(item, dict) for item in items):
        raise MalformedNotification("'value' holds something that is not an object")
    return items


def _nests_deeper_than(document: object, limit: int) -> bool:
    """True if arrays and objects nest more than `limit` deep; pure, and without recursion, so
    any depth the parser returned is safe to measure."""
    pending: list[tuple[dict[str, Any] | list[Any], int]] = []
    if isinstance(document, dict | list):
        pending.append((document, 1))
    while pending:
        node, depth = pending.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def travels_unencrypted(url: str) -> bool:
    """True for a notificationUrl on plain `http`/`ws` to a host that is not loopback: the socket,
    and the credential in its query, would cross the network in clear text; pure.

    `https`/`wss` are fine, and so is any scheme to loopback (127.0.0.0/8, ::1, localhost), where
    nothing leaves the machine: a local emulator, or a tunnel's local end.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "ws"):
        return False
    return not _is_loopback(parts.hostname or "")


def _is_loopback(host: str) -> bool:
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        address = ip_address(name)
    except ValueError:
        return False  # a name: whatever it resolves to, it is not known to stay on this machine
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0


def backoff_delay(
    attempt: int,
    *,
    initial: float = BACKOFF_INITIAL,
    cap: float = BACKOFF_MAX,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped; pure.

    The random half spreads thousands of drives that lost their connections at the same moment.
    """
    base: float = min(cap, initial * 2.0 ** min(max(attempt - 1, 0), 30))
    return base / 2 + rand() * base / 2


def retry_delay(attempt: int, error: BaseException | None) -> float:
    """How long to wait before asking Graph again after `attempt` failures: the backoff, or the
    Retry-After Graph gave with the error, whichever is longer; pure."""
    delay = backoff_delay(attempt)
    if isinstance(error, GraphError) and error.retry_after is not None:
        return max(delay, error.retry_after)
    return delay


def pauses_tenant(error: GraphError) -> bool:
    """A throttled answer, which pauses every request of the tenant: a 429, or a 503 that
    says when to come back (Retry-After); pure. A bare 503 is an outage of that one request's
    server as often as throttling: the request's own backoff covers it."""
    return error.status == 429 or (error.status == 503 and error.retry_after is not None)


TokenSource = Callable[[str | None], Awaitable[str]]
"""Gives a bearer token. Called with the token that was just refused (401), or None."""


class GraphClient:
    """Authenticated GETs to Graph. One per process; safe to share between drives.

    Every request waits for a turn from its tenant's gate (relayd/tenant.py): the tenant's
    budget (`requests_per_minute` in any 60 s), its pause after a throttled answer, and fair
    turns between its drives.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: float = 30.0,
        request_options: Mapping[str, Any] | None = None,
        requests_per_minute: int = 600,
        window: float = WINDOW,
    ):
        """`request_options`: extra aiohttp arguments for every request (the proxy to use);
        `window`: the budget's "minute" (only tests shorten it, to see a budget bind)."""
        self._session = session
        self._request_options = dict(request_options or {})
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(self.base_url)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.requests_per_minute = requests_per_minute
        self._window = window
        self._tenants: dict[str, TenantGate] = {}

    def tenant(self, name: str) -> TenantGate:
        """The tenant's gate, made at its first request."""
        gate = self._tenants.get(name)
        if gate is None:
            gate = self._tenants[name] = TenantGate(
                name, self.requests_per_minute, window=self._window
            )
        return gate

    def tenants(self) -> list[TenantReport]:
        return [gate.report() for _, gate in sorted(self._tenants.items())]

    def drive_url(self, resource: str, tail: str) -> str:
        return f"{self.base_url}/{resource_path(resource)}/root/{tail}"

    async def drive_id(
        self,
        resource: str,
        token: TokenSource,
        *,
        tenant: str = DEFAULT_TENANT,
        drive: str = "",
    ) -> str:
        """GET the id of the drive behind `resource` (`me` -> `/me/drive?$select=id`); a
        connect's turn in its tenant's line (the socket waits for it)."""
        body = await self.get_json(
            f"{self.base_url}/{resource_path(resource)}?$select=id",
            token,
            tenant=tenant,
            drive=drive,
            priority=Priority.CONNECT,
        )
        return parse_drive_id(body)

    async def socketio_endpoint(
        self,
        resource: str,
        token: TokenSource,
        *,
        tenant: str = DEFAULT_TENANT,
        drive: str = "",
        priority: Priority = Priority.CONNECT,
    ) -> Subscription:
        """GET the drive's socketIo endpoint (a connect's or a renewal's turn: first in line)."""
        body = await self.get_json(
            self.drive_url(resource, "subscriptions/socketIo"),
            token,
            tenant=tenant,
            drive=drive,
            priority=priority,
        )
        return parse_subscription(body)

    async def get_json(
        self,
        url: str,
        token: TokenSource,
        *,
        tenant: str = DEFAULT_TENANT,
        drive: str = "",
        priority: Priority = Priority.ROUND,
    ) -> object:
        """GET a Graph URL and decode its JSON. A 401 gets one retry with a fresh token.

        Only URLs on Graph's own origin are fetched: the bearer token goes with the request, and a
        paging link that pointed elsewhere would hand it to someone else. Each request (the 401
        retry too) waits for its turn in `tenant`'s line (`drive` and `priority` place it
        there); a throttled answer pauses the whole tenant before it is raised.
        """
        if _origin(url) != self._origin:
            raise InvalidGraphResponse(f"refusing to send a token to {_origin(url)}")
        gate = self.tenant(tenant)
        refused: str | None = None
        while True:
            # The token first: a token source that hangs must not hold a place in the window.
            bearer = await token(refused)
            async with (
                gate.turn(drive, priority),
                self._session.get(
                    url,
                    headers={"Authorization": f"Bearer {bearer}", "Accept": "application/json"},
                    timeout=self._timeout,
                    allow_redirects=False,
                    **self._request_options,
                ) as response,
            ):
                body = await response.read()
                if response.status == 200:
                    gate.succeeded()
                    try:
                        return json.loads(body)
                    except ValueError:
                        raise InvalidGraphResponse(
                            f"{response.status} answer is not JSON"
                        ) from None
                error = parse_graph_error(response.status, body, response.headers)
            if pauses_tenant(error):
                gate.throttled(error.retry_after, drive=drive, status=error.status)
            else:
                gate.succeeded()
            if error.unauthorized and refused is None:
                refused = bearer
                continue
            raise error


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()
