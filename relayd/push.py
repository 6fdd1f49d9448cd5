"""The push service's socket: a small Engine.IO 4 / Socket.IO 5 client on aiohttp's WebSocket.

Graph's socketIo endpoint needs little of either protocol: one WebSocket (no long-polling, no
upgrade), one namespace joined, pongs for the server's pings, `notification` events read in
order, and a close. relayd speaks that itself, with python-engineio's and python-socketio's
public packet codecs (`engineio.packet`, `socketio.packet`), instead of subclassing their
clients: those clients run a read task, a write task and a timer per socket, and relayd had to
override their private methods to keep events in order and pongs cheap (docs/graph-socketio.md
says why this shape was chosen). Here the drive's own task reads its socket; nothing else runs.

The protocol is pure and apart (`engineio_url`, `ping_times`, `read_frame`); `PushSocket` only
moves frames. `PushSocket.relay` reads until the line is lost, or until `wake()` (the drive is
stopping, a renewal is due or done) is called from elsewhere in the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import engineio.packet
import socketio.packet
import structlog

_log = structlog.get_logger("relayd.push")

# Engine.IO's packet types, as its codec names them.
_OPEN = str(engineio.packet.OPEN)
_CLOSE = str(engineio.packet.CLOSE)
# How long a socket being replaced is still read for what the server sent before the leave.
DRAIN_LIMIT = 0.25
_PING = str(engineio.packet.PING)
_MESSAGE = str(engineio.packet.MESSAGE)
_NOOP = str(engineio.packet.NOOP)
_PONG = engineio.packet.Packet(engineio.packet.PONG).encode()  # "3", encoded once


class ProtocolError(Exception):
    """The server said something the protocol does not allow here (no secret in the text)."""


class Refused(Exception):
    """The server refused to join the namespace (Socket.IO CONNECT_ERROR); its message."""


class LineLost(Exception):
    """The socket closed, the server left the namespace, or the line went silent."""


# ---- pure: the protocol -------------------------------------------------------------------------


def engineio_url(server_url: str, path: str = "socket.io") -> str:
    """The WebSocket URL for a server URL (`scheme://host[:port]?query`); pure.

    The query, the notificationUrl's credential, passes through unchanged, as in
    python-engineio's client: `{ws|wss}://host/socket.io/?{query}&transport=websocket&EIO=4`.
    """
    parts = urllib.parse.urlsplit(server_url)
    scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
    query = f"{parts.query}&" if parts.query else ""
    return f"{scheme}://{parts.netloc}/{path.strip('/')}/?{query}transport=websocket&EIO=4"


@dataclass(frozen=True)
class PingTimes:
    """The server's ping interval and timeout, seconds; silence past their sum is a dead line."""

    interval: float
    timeout: float

    @property
    def silence(self) -> float:
        return self.interval + self.timeout


def ping_times(opening: str) -> PingTimes:
    """The ping times of an Engine.IO OPEN packet (`0{"sid":...,"pingInterval":25000,...}`);
    pure. Raises ProtocolError for anything else."""
    if opening[:1] != _OPEN:
        raise ProtocolError(f"expected Engine.IO OPEN, got packet type {opening[:1]!r}")
    try:
        fields = engineio.packet.Packet(encoded_packet=opening).data
        interval = float(fields["pingInterval"]) / 1000
        timeout = float(fields["pingTimeout"]) / 1000
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"Engine.IO OPEN packet without ping times ({exc!r})") from None
    if not (interval > 0 and timeout > 0):
        raise ProtocolError("Engine.IO OPEN packet with ping times that are not positive")
    return PingTimes(interval, timeout)


def join_packet(namespace: str) -> str:
    """Engine.IO MESSAGE carrying Socket.IO CONNECT to `namespace` (`40/notifications,`)."""
    return _MESSAGE + str(
        socketio.packet.Packet(socketio.packet.CONNECT, namespace=namespace).encode()
    )


def leave_packet(namespace: str) -> str:
    """Engine.IO MESSAGE carrying Socket.IO DISCONNECT from `namespace` (`41/notifications,`)."""
    return _MESSAGE + str(
        socketio.packet.Packet(socketio.packet.DISCONNECT, namespace=namespace).encode()
    )


@dataclass(frozen=True)
class Frame:
    """What one text frame means to a client of one namespace.

    `kind`: "ping", "event" (`args` = the event's name and arguments), "malformed" (an event
    whose JSON does not parse; `args` = [why]), "joined", "refused" (`args` = [the server's
    message]), "left" (the server's DISCONNECT), "close", "ignore" (noops, other namespaces,
    acks), "unexpected" (`args` = [what, for the log]).
    """

    kind: str
    args: tuple[Any, ...] = ()


PING = Frame("ping")
IGNORE = Frame("ignore")


def read_frame(text: str, namespace: str) -> Frame:
    """Decode one text frame of the socket; pure, and never raises."""
    kind = text[:1]
    if kind == _PING:
        return PING  # the common case, first and without decoding: an idle drive's only frame
    if kind == _MESSAGE:
        try:
            return _read_socketio(text[1:], namespace)
        except ValueError as exc:  # JSONDecodeError included; the text is not echoed
            return Frame("malformed", (f"Socket.IO packet does not decode ({type(exc).__name__})",))
    if kind == _CLOSE:
        return Frame("close")
    if kind == _NOOP:
        return IGNORE
    return Frame("unexpected", (f"Engine.IO packet type {kind!r}",))


def _read_socketio(text: str, namespace: str) -> Frame:
    pkt = socketio.packet.Packet(encoded_packet=text)
    if (pkt.namespace or "/") != namespace:
        return IGNORE
    kind = pkt.packet_type
    if kind in (socketio.packet.EVENT, socketio.packet.BINARY_EVENT):
        if not isinstance(pkt.data, list) or not pkt.data:
            raise ValueError("event without a name")
        return Frame("event", tuple(pkt.data))
    if kind == socketio.packet.CONNECT:
        return Frame("joined")
    if kind == socketio.packet.CONNECT_ERROR:
        data = pkt.data
        message = data.get("message") if isinstance(data, dict) else data
        return Frame("refused", (str(message) if message is not None else "no reason given",))
    if kind == socketio.packet.DISCONNECT:
        return Frame("left")
    return IGNORE  # acks: relayd emits nothing that asks for one


# ---- the socket ---------------------------------------------------------------------------------

EventHandler = Callable[[Frame], Awaitable[None]]


class PushSocket:
    """One Engine.IO WebSocket that has joined one Socket.IO namespace.

    `relay()` is meant to run in the task that owns the drive: it answers pings, hands events to
    `on_event` in arrival order (awaiting it: a handler that waits stops the reads, and TCP
    pushes back on the sender), and returns once `wake()` is called, or raises LineLost. The
    silence check and the deadline are one timer callback, not a task, and the read is not
    wrapped in a timeout per frame.
    """

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, namespace: str, times: PingTimes
    ) -> None:
        self._ws = ws
        self.namespace = namespace
        self.times = times
        self._loop = asyncio.get_running_loop()
        self._last_read = self._loop.time()
        self._reader: asyncio.Task[Any] | None = None  # the task inside relay()'s receive
        self._woken: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._closed = False

    @classmethod
    async def connect(
        cls,
        session: aiohttp.ClientSession,
        server_url: str,
        namespace: str,
        *,
        cap: Callable[[PingTimes], PingTimes] = lambda times: times,
        options: Mapping[str, Any] | None = None,
    ) -> PushSocket:
        """Open the WebSocket and join `namespace`. The caller bounds the time it takes.

        `cap` may lower the ping times the server announced (relayd trusts them only so far).
        Raises Refused, ProtocolError, LineLost, or aiohttp's and the OS's connection errors."""
        ws = await session.ws_connect(engineio_url(server_url), **(options or {}))
        try:
            opening = await ws.receive()
            if opening.type is not aiohttp.WSMsgType.TEXT:
                raise LineLost(f"closed before the Engine.IO handshake ({opening.type.name})")
            sock = cls(ws, namespace, cap(ping_times(opening.data)))
            await ws.send_str(join_packet(namespace))
            while True:
                frame = await sock._next_frame()
                if frame.kind == "joined":
                    return sock
                if frame.kind == "refused":
                    raise Refused(frame.args[0])
                if frame.kind in ("left", "close"):
                    raise LineLost("the server closed the socket while joining")
                if frame.kind in ("event", "malformed"):
                    raise ProtocolError("an event before the namespace was joined")
        except BaseException:
            with contextlib.suppress(OSError, aiohttp.ClientError, TimeoutError):
                await ws.close()
            raise

    async def _next_frame(self) -> Frame:
        """The next frame that is not a ping (pings are answered here), during the handshake."""
        while True:
            message = await self._ws.receive()
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise LineLost(f"socket closed ({message.type.name})")
            frame = read_frame(message.data, self.namespace)
            if frame is PING:
                await self._ws.send_str(_PONG)
                continue
            return frame

    def wake(self, reason: str) -> None:
        """Make `relay()` return `reason`, now or, if it is inside `on_event`, when that returns.

        Called from the loop's own thread while relay()'s task is suspended. If it waits in the
        receive, it is cancelled there: aiohttp keeps a frame that arrived meanwhile in its
        buffer (it is taken only after the wait), so nothing read is lost. If it waits in
        `on_event` (a full inbox), it is not interrupted: the event it holds is kept."""
        if self._woken is not None:
            return
        self._woken = reason
        if self._reader is not None:
            self._reader.cancel()

    def wake_at(self, when: float | None) -> None:
        """Wake `relay()` with "deadline" at loop time `when` (None: no deadline)."""
        self._deadline = when
        self._arm()

    async def relay(self, on_event: EventHandler) -> str:
        """Read until woken (returns the reason given to wake) or until the line is lost
        (raises LineLost with what happened)."""
        ws, namespace = self._ws, self.namespace
        task = asyncio.current_task()
        self._arm()
        try:
            while self._woken is None:
                self._reader = task
                try:
                    message = await ws.receive()
                except asyncio.CancelledError:
                    if self._woken is None or task is None or task.uncancel() > 0:
                        raise  # cancelled by someone else than wake()
                    break
                finally:
                    self._reader = None
                self._last_read = self._loop.time()
                if message.type is not aiohttp.WSMsgType.TEXT:
                    if message.type is aiohttp.WSMsgType.BINARY:
                        continue  # attachments: Graph's events carry none
                    raise LineLost(_closed_reason(message, ws))
                frame = read_frame(message.data, namespace)
                if frame is PING:
                    # A failure shows on the next read (the socket closes): nothing to do here.
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        await ws.send_str(_PONG)
                elif frame.kind in ("event", "malformed"):
                    await on_event(frame)
                elif frame.kind == "left":
                    raise LineLost("disconnected (the server left the namespace)")
                elif frame.kind == "close":
                    raise LineLost("disconnected (the server closed the Engine.IO session)")
                elif frame.kind == "unexpected":
                    _log.warning(
                        "unexpected packet from the push service ignored", what=frame.args[0]
                    )
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        woken, self._woken = self._woken, None
        assert woken is not None
        if woken == "silence":
            raise LineLost(f"no ping for {self.times.silence:g} s (the line went silent)")
        return woken

    def _arm(self, earliest: float = 0.0) -> None:
        """One timer per socket, at the earlier of the deadline and the silence limit. It is
        moved only when it fires (a ping pushes the silence limit without touching it)."""
        if self._timer is not None:
            self._timer.cancel()
        when = max(self._last_read + self.times.silence, earliest)
        if self._deadline is not None:
            when = min(when, self._deadline)
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self.wake("deadline")
        elif self._reader is None:
            # Not reading (a full inbox holds the handler): the wait is relayd's, not the line's.
            self._arm(now + self.times.silence)
        elif now >= self._last_read + self.times.silence:
            self.wake("silence")
        else:
            self._arm()

    async def close(self, timeout: float, drain: EventHandler | None = None) -> None:
        """Leave the namespace and close the WebSocket, within `timeout` seconds; never raises
        for a line that is already gone.

        `drain`: hand on the events the server sent before it saw the leave, until it ends the
        session. A switch-over needs that: a notification sent just before the fresh socket
        joined travels on this one alone, and aiohttp's close() discards whatever arrives while
        it waits for the server's closing frame.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, aiohttp.ClientError, TimeoutError, RuntimeError):
            async with asyncio.timeout(timeout):
                if not self._ws.closed:
                    with contextlib.suppress(OSError, aiohttp.ClientError, RuntimeError):
                        await self._ws.send_str(leave_packet(self.namespace))
                        if drain is not None:
                            await self._ws.send_str(_CLOSE)  # the session ends after the leave
                            # Bounded on its own: what was sent before the leave arrives within
                            # a round trip; a server slow to end the session must not hold the
                            # switch-over (the fresh socket is not read meanwhile).
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(DRAIN_LIMIT):
                                    await self._drain(drain)
                await self._ws.close()

    async def _drain(self, on_event: EventHandler) -> None:
        """Read what is still on the line until the server closes it, handing events on."""
        while True:
            message = await self._ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                continue
            if message.type is not aiohttp.WSMsgType.TEXT:
                return
            frame = read_frame(message.data, self.namespace)
            if frame.kind in ("event", "malformed"):
                await on_event(frame)
            elif frame.kind in ("left", "close"):
                return


def _closed_reason(message: aiohttp.WSMessage, ws: aiohttp.ClientWebSocketResponse) -> str:
    if message.type is aiohttp.WSMsgType.ERROR:
        return f"transport error ({type(message.data).__name__})"
    code = ws.close_code
    return f"socket closed (code {code})" if code is not None else "socket closed"
