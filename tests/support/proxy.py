"""A TCP proxy whose traffic can be frozen: network silence and abrupt drops on demand.

Tests put it between a relay and the Graph emulator's push service (the emulator's push_base_url
names the proxy). `freeze()` stops bytes in both directions without closing anything, which is
what a dead NAT or a half-open connection looks like to a WebSocket client: no close, no error,
just silence until its ping deadline. `drop_all()` resets every connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["FreezableProxy"]

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One client connection, its upstream twin, and the two tasks pumping bytes between them."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    dropped: bool = False

    def reset(self) -> None:
        """Close both sides at once, with RST rather than FIN: an abrupt drop."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async def close(self) -> None:
        """Close both sides the ordinary way, after what is buffered has been sent."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def drop(self) -> None:
        self.dropped = True
        self.reset()
        for pump in self.pumps:
            pump.cancel()


class FreezableProxy:
    """Forwards `host`:`port` to `target_host`:`target_port`, byte for byte, unless frozen.

    `host` may be another loopback address (127.0.0.2): the same server seen as a second host."""

    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self.accepted = 0  # connections accepted, ever
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        # asyncio runs one handler task per connection; the proxy keeps them all, with their
        # links, so drop_all() and stop() can end each and wait for it.
        self._handlers: dict[asyncio.Task[None], _Link] = {}

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._handlers)

    def freeze(self) -> None:
        """Stop forwarding in both directions, on current and new connections; close nothing."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, starting with whatever was held back."""
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting and reset every connection. Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await self.drop_all()
        await server.wait_closed()

    async def drop_all(self) -> int:
        """Reset every current connection abruptly; returns how many there were."""
        handlers = list(self._handlers.items())
        for _, link in handlers:
            link.drop()
        if handlers:
            await asyncio.wait([task for task, _ in handlers])
        return len(handlers)

    async def __aenter__(self) -> FreezableProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Never cancelled from here: Python 3.11's start_server logs a cancelled handler as an
        # error. drop_all() cancels the pumps instead, and this returns normally.
        task = asyncio.current_task()
        assert task is not None
        link = _Link(client=writer)
        self._handlers[task] = link
        self.accepted += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                link.drop()  # target down: the client sees its connection reset, as without us
                return
            link.upstream = up_writer
            if link.dropped:  # dropped while connecting upstream
                link.reset()
                return
            link.pumps = [
                asyncio.create_task(self._pump(reader, up_writer, link)),
                asyncio.create_task(self._pump(up_reader, writer, link)),
            ]
            await asyncio.wait(link.pumps)
        finally:
            if not link.dropped:
                await link.close()
            del self._handlers[task]

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                data = await src.read(_CHUNK)
                # Frozen: hold this chunk, and by not reading on, everything behind it.
                await self._flowing.wait()
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()  # pass a half-close on; the other direction may go on
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            # A reset on one side resets the other, but not through a frozen link.
            await self._flowing.wait()
            link.reset()
