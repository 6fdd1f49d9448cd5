"""Run the reference JavaScript Socket.IO v4 server (tests/interop/server.js) for interop tests.

The server mimics what relayd sees from Microsoft Graph's socketIo push service: WebSocket
transport only, Engine.IO path ``/socket.io/``, one namespace guarded by a query-string token,
and a ``notification`` event whose single argument is a JSON *string*.

Usage::

    async with JsSocketIoServer() as js:
        url = js.notification_url()  # what Graph would hand out
        ...
        await js.emit(3)

Needs ``node`` on PATH and ``npm ci --prefix tests/interop`` to have been run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import aiohttp

INTEROP_DIR = Path(__file__).resolve().parent
SERVER_JS = INTEROP_DIR / "server.js"
SOCKET_IO_PACKAGE = INTEROP_DIR / "node_modules" / "socket.io" / "package.json"

HOST = "127.0.0.1"
APPLICATION_ID = "js-app"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
CONTROL_TIMEOUT = 10.0
_STDERR_LIMIT = 64 * 1024


class JsServerError(RuntimeError):
    """The node server could not be started, or a control request failed."""


def _find_node() -> str:
    node = os.environ.get("RELAYD_NODE") or shutil.which("node")
    if not node:
        raise JsServerError(
            "node is not on PATH (set RELAYD_NODE to a node binary); the interop tests need Node.js"
        )
    return node


def _check_node_modules() -> None:
    if not SOCKET_IO_PACKAGE.is_file():
        raise JsServerError(
            f"{SOCKET_IO_PACKAGE.parent} is missing: run `npm ci --prefix tests/interop` "
            "from the repository root before running the interop tests"
        )


class JsSocketIoServer:
    """Runs tests/interop/server.js under node as a subprocess on 127.0.0.1."""

    def __init__(
        self,
        *,
        namespace: str = "/notifications",
        token: str = "js-token",
        query_key: str = "token",
        ping_interval_ms: int = 25000,
        ping_timeout_ms: int = 20000,
    ) -> None:
        if not namespace.startswith("/") or namespace == "/":
            raise ValueError(f"namespace must be a path like /notifications, got {namespace!r}")
        self.namespace = namespace
        self.token = token
        self.query_key = query_key
        self.ping_interval_ms = ping_interval_ms
        self.ping_timeout_ms = ping_timeout_ms
        self.port: int = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stderr = bytearray()
        self._stdout = bytearray()
        self._drains: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> JsSocketIoServer:
        _check_node_modules()
        node = _find_node()
        self._proc = await asyncio.create_subprocess_exec(
            node,
            str(SERVER_JS),
            "--port",
            "0",
            "--host",
            HOST,
            "--namespace",
            self.namespace,
            "--token",
            self.token,
            "--query-key",
            self.query_key,
            "--ping-interval",
            str(self.ping_interval_ms),
            "--ping-timeout",
            str(self.ping_timeout_ms),
            "--exit-on-stdin-eof",
            cwd=INTEROP_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert self._proc.stderr is not None
            self._drains.append(
                asyncio.create_task(
                    self._drain(self._proc.stderr, self._stderr), name="node-stderr"
                )
            )
            self.port = await self._wait_listening()
            assert self._proc.stdout is not None
            self._drains.append(
                asyncio.create_task(
                    self._drain(self._proc.stdout, self._stdout), name="node-stdout"
                )
            )
            self._session = aiohttp.ClientSession(
                base_url=self.base_url,
                timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT),
            )
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _wait_listening(self) -> int:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await proc.stdout.readline()
        except TimeoutError:
            raise JsServerError(
                f"node server did not print 'listening <port>' within {START_TIMEOUT:.0f} s; "
                f"stderr:\n{self.stderr_text()}"
            ) from None
        text = line.decode(errors="replace").strip()
        parts = text.split()
        if len(parts) == 2 and parts[0] == "listening" and parts[1].isdigit():
            return int(parts[1])
        # Died (EOF) or printed something unexpected: collect what it said and report.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await proc.wait()
                await asyncio.gather(*self._drains, return_exceptions=True)
        raise JsServerError(
            f"node server failed to start (exit code {proc.returncode}, stdout {text!r}); "
            f"stderr:\n{self.stderr_text()}"
        )

    @staticmethod
    async def _drain(stream: asyncio.StreamReader, buffer: bytearray) -> None:
        while chunk := await stream.read(4096):
            buffer.extend(chunk)
            if len(buffer) > _STDERR_LIMIT:
                del buffer[: len(buffer) - _STDERR_LIMIT]

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            if proc.stdin is not None:
                proc.stdin.close()
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.wait_closed()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        # The pipes reach EOF once node is gone; give the drains a moment, then cancel them.
        if self._drains:
            _done, pending = await asyncio.wait(self._drains, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._drains, return_exceptions=True)
            self._drains.clear()

    # ------------------------------------------------------------------ addresses

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:{port}``: the Socket.IO server and its control routes."""
        return f"http://{HOST}:{self.port}"

    @property
    def query(self) -> str:
        """The opaque query string Graph would put in notificationUrl."""
        return urlencode({self.query_key: self.token, "applicationId": APPLICATION_ID})

    def notification_url(self) -> str:
        """The URL the way Graph hands it out: the namespace is the path, plus the query."""
        return f"{self.base_url}{self.namespace}?{self.query}"

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def stderr_text(self) -> str:
        """What node wrote to stderr so far (the last 64 KiB)."""
        return self._stderr.decode(errors="replace")

    # ------------------------------------------------------------------ control

    async def _control(self, method: str, route: str, params: dict[str, str]) -> dict[str, Any]:
        if self._session is None:
            raise JsServerError("server is not running (use `async with JsSocketIoServer()`)")
        async with self._session.request(method, f"/control/{route}", params=params) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise JsServerError(f"{method} /control/{route} -> {resp.status}: {body}")
            result: dict[str, Any] = await resp.json(content_type=None)
            return result

    async def emit(self, count: int = 1, *, raw: str | None = None) -> dict[str, int]:
        """Emit ``count`` numbered notifications (or ``raw`` once) to every socket.

        Returns ``{"emitted": n, "sockets": k, "last_seq": seq}``.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        params = {"count": str(count)}
        if raw is not None:
            params["raw"] = raw
        result = await self._control("POST", "emit", params)
        return {key: int(result[key]) for key in ("emitted", "sockets", "last_seq")}

    async def kick(self) -> int:
        """Disconnect every socket in the namespace from the server side; returns how many."""
        result = await self._control("POST", "kick", {})
        return int(result["kicked"])

    async def clients(self) -> int:
        """How many sockets are connected to the namespace."""
        result = await self._control("GET", "clients", {})
        return int(result["clients"])

    async def wait_clients(self, n: int, timeout: float = 10.0) -> None:
        """Poll until exactly ``n`` sockets are connected to the namespace.

        Raises TimeoutError (with the last count seen) after ``timeout`` seconds.
        """
        last: int | None = None
        try:
            async with asyncio.timeout(timeout):
                # The count lives in another process: polling its HTTP route is the only way
                # to watch it, so there is no event to wait on here.
                while (last := await self.clients()) != n:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise TimeoutError(
                f"expected {n} client(s) on {self.namespace} within {timeout} s, last count {last}"
            ) from None
