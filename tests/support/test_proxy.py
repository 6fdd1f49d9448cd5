"""FreezableProxy forwards bytes, holds them while frozen without closing, and drops on demand."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import socketio

from relayd.emulator import GraphEmulator
from support.proxy import FreezableProxy
from support.waiting import wait_until

# How long "nothing arrives" is watched for. A negative can only be checked over some window.
QUIET = 0.3


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
async def proxy(echo_port: int) -> AsyncIterator[FreezableProxy]:
    async with FreezableProxy(echo_port) as p:
        yield p


@contextlib.asynccontextmanager
async def connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_bytes_flow_both_ways(proxy: FreezableProxy) -> None:
    async with connection(proxy.port) as (reader, writer):
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        assert proxy.connections == 1
    await wait_until(lambda: proxy.connections == 0)
    assert proxy.accepted == 1


async def test_freeze_holds_bytes_without_closing_and_thaw_releases_them(
    proxy: FreezableProxy,
) -> None:
    async with connection(proxy.port) as (reader, writer):
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"one"

        proxy.freeze()
        assert proxy.frozen
        writer.write(b"two")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), QUIET)
        assert not reader.at_eof()  # silence, not a close
        assert proxy.connections == 1

        proxy.thaw()
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"two"


async def test_new_connections_are_frozen_too(proxy: FreezableProxy) -> None:
    proxy.freeze()
    async with connection(proxy.port) as (reader, writer):
        writer.write(b"early")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), QUIET)
        proxy.thaw()
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"early"


async def test_drop_all_resets_connections(proxy: FreezableProxy) -> None:
    async with connection(proxy.port) as (reader, writer):
        writer.write(b"x")
        await asyncio.wait_for(reader.readexactly(1), 5)
        assert await proxy.drop_all() == 1
        assert proxy.connections == 0
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(10), 5) == b""
    # The proxy itself still accepts.
    async with connection(proxy.port) as (reader, writer):
        writer.write(b"y")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"y"


async def test_drop_all_works_while_frozen(proxy: FreezableProxy) -> None:
    async with connection(proxy.port) as (reader, writer):
        proxy.freeze()
        writer.write(b"held")
        await wait_until(lambda: proxy.connections == 1)
        assert await proxy.drop_all() == 1
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(10), 5) == b""


async def test_target_down_resets_the_client() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with FreezableProxy(port) as proxy, connection(proxy.port) as (reader, _):
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(10), 5) == b""
        await wait_until(lambda: proxy.connections == 0)


async def test_stop_ends_everything_and_is_idempotent(echo_port: int) -> None:
    proxy = FreezableProxy(echo_port)
    await proxy.start()
    async with connection(proxy.port) as (reader, writer):
        proxy.freeze()
        writer.write(b"z")
        await proxy.stop()
        await proxy.stop()
        assert proxy.connections == 0
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(10), 5) == b""
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)


async def test_a_socketio_client_behind_a_frozen_proxy_hears_silence_then_times_out() -> None:
    async with (
        GraphEmulator(ping_interval=0.3, ping_timeout=0.3) as graph,
        FreezableProxy(graph.port) as proxy,
        aiohttp.ClientSession() as http,
    ):
        graph.push_base_url = f"http://127.0.0.1:{proxy.port}"
        url = graph.base_url + "/me/drive/root/subscriptions/socketIo"
        async with http.get(url, headers={"Authorization": "Bearer test-token"}) as resp:
            notification_url = (await resp.json())["notificationUrl"]
        assert notification_url.startswith(f"http://127.0.0.1:{proxy.port}/notifications?")

        client = socketio.AsyncClient(reconnection=False)
        events: list[str] = []
        gone = asyncio.Event()
        client.on("notification", events.append, namespace="/notifications")
        client.on("disconnect", lambda *_: gone.set(), namespace="/notifications")
        query = notification_url.partition("?")[2]
        await client.connect(
            f"http://127.0.0.1:{proxy.port}?{query}",
            namespaces=["/notifications"],
            transports=["websocket"],
        )
        try:
            await graph.emit("me")
            await wait_until(lambda: len(events) == 1)
            proxy.freeze()
            frozen_at = time.monotonic()
            await graph.emit("me")
            # No close arrives: the client notices only by its own ping deadline.
            await asyncio.wait_for(gone.wait(), 5)
            # Not at once: the client's deadline (ping interval + timeout, 0.6 s) ran from its
            # last frame, received just before the freeze.
            assert time.monotonic() - frozen_at >= 0.3
            assert len(events) == 1
            # The server noticed too, by the missing pongs.
            await wait_until(lambda: graph.connected("me") == 0)
        finally:
            await client.disconnect()
            await close_abandoned_websocket(client)
        gc.collect()  # an unclosed connection would warn here, in this test, not in a later one


async def close_abandoned_websocket(client: socketio.AsyncClient) -> None:
    """Close the websocket python-socketio leaves open after a ping timeout.

    Its read loop gives up on silence without closing the aiohttp websocket, whose connection
    then warns "Unclosed connection" when collected. Cancelling `close()` (here by a timeout) is
    aiohttp's way to abort one: it closes the connection without waiting for the peer.
    """
    ws = client.eio.ws
    if ws is not None and not ws.closed:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.close(), 0.1)
