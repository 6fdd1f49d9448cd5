"""A local webhook endpoint that records what a relay delivers and answers as scripted.

Tests point a relay's webhooks at it to check what arrives and to play the other side's
misbehaviour: outages (503, or `stop()` then `start()` again on the same port), 4xx, 429 with
Retry-After, slow answers. `relayd demo` uses it with `on_request` to print what arrives.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from relayd.waiting import wait_event

__all__ = ["ReceivedRequest", "ScriptedResponse", "WebhookReceiver"]

log = logging.getLogger(__name__)

# How long stop() lets in-flight answers finish before the web server cuts them.
_SHUTDOWN_GRACE = 1.0


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as it arrived, and the status it was (or is being) answered with."""

    path: str  # "/hook"; no query string
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    at: float  # time.monotonic() on arrival
    method: str = "POST"
    status: int = 200

    @property
    def name(self) -> str:
        """The path without its leading slash: what `url(name)` was called with."""
        return self.path.lstrip("/")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class ScriptedResponse:
    """How to answer one request. `delay` is waited before answering."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: str = ""


def _name(path_name: str) -> str:
    return path_name.lstrip("/")


class WebhookReceiver:
    """Records every request on any path; answers each path from its script, then its default.

    `requests` holds every request as it arrives; `received` only those answered 2xx (added once
    the answer is due, after any delay): what the relay may count as delivered.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        on_request: Callable[[ReceivedRequest], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: serve HTTPS with it (see relayd.emulator.tls); plain HTTP without."""
        self._ssl_context = ssl_context
        self.host = host
        self.port = port
        self.requests: list[ReceivedRequest] = []
        self.received: list[ReceivedRequest] = []
        self._on_request = on_request
        self._scripts: dict[str, collections.deque[ScriptedResponse]] = {}
        self._defaults: dict[str, ScriptedResponse] = {}
        self._delivered = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._state: Literal["stopped", "running"] = "stopped"

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def url(self, name: str = "hook") -> str:
        return f"{self.base_url}/{_name(name)}"

    async def start(self) -> None:
        """Serve. After a `stop()`, starts again on the same port, keeping what was recorded."""
        if self._state == "running":
            raise RuntimeError("the receiver is already running")
        self._closing.clear()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._state = "running"

    async def stop(self) -> None:
        """Stop serving; delayed answers still pending are cut short with 503. Idempotent."""
        if self._runner is None:
            return
        self._closing.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()
        self._state = "stopped"

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def script(self, path_name: str, responses: Iterable[ScriptedResponse]) -> None:
        """Answer the next requests on this path with these, in order (after any still queued)."""
        self._scripts.setdefault(_name(path_name), collections.deque()).extend(responses)

    def set_default(self, path_name: str, response: ScriptedResponse) -> None:
        """Answer with this once the path's script is used up (initially: 200, empty body)."""
        self._defaults[_name(path_name)] = response

    def delivered(self, name: str = "hook") -> list[ReceivedRequest]:
        """Requests on this path answered 2xx, in order of answer."""
        wanted = _name(name)
        return [r for r in self.received if r.name == wanted]

    async def wait_for(
        self,
        count: int,
        *,
        name: str = "hook",
        timeout: float = 10.0,
    ) -> list[ReceivedRequest]:
        """Wait until `delivered(name)` holds at least `count`; return it.

        Raises TimeoutError, saying how many arrived, if that takes longer than `timeout`.
        """
        try:
            async with asyncio.timeout(timeout), self._delivered:
                await self._delivered.wait_for(lambda: len(self.delivered(name)) >= count)
        except TimeoutError:
            wanted = _name(name)
            tried = sum(1 for r in self.requests if r.name == wanted)
            raise TimeoutError(
                f"{len(self.delivered(name))} of {count} deliveries to /{wanted} arrived within "
                f"{timeout}s ({tried} requests on that path in all)"
            ) from None
        return self.delivered(name)

    def _next_response(self, name: str) -> ScriptedResponse:
        queued = self._scripts.get(name)
        if queued:
            return queued.popleft()
        return self._defaults.get(name, ScriptedResponse())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = self._next_response(_name(request.path))
        record = ReceivedRequest(
            path=request.path,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
            at=time.monotonic(),
            method=request.method,
            status=answer.status,
        )
        self.requests.append(record)
        if self._on_request is not None:
            try:
                self._on_request(record)
            except Exception:  # a printing callback must not turn deliveries into 500s
                log.exception("on_request callback failed")
        if answer.delay > 0:
            # Waiting on the closing event rather than sleeping lets stop() cut the delay short.
            await wait_event(self._closing, answer.delay)
        if self._closing.is_set():
            return web.Response(status=503, text="receiver stopping")
        if 200 <= answer.status < 300:
            self.received.append(record)
            async with self._delivered:
                self._delivered.notify_all()
        return web.Response(
            status=answer.status, text=answer.body or None, headers=dict(answer.headers)
        )
