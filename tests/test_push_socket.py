"""relayd.push's socket against a minimal Engine.IO server on a real loopback socket.

The server below speaks just enough Engine.IO 4 / Socket.IO 5 to script one exchange exactly:
what it sends after it reads relayd's leave. (Pongs, order, back-pressure, silence and renewal
against full servers: test_watcher.py and tests/interop.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from relayd.push import Frame, PushSocket, leave_packet

NS = "/notifications"
OPEN = '0{"sid":"s1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}'


class LastWordServer:
    """Joins the namespace; on the leave, sends one more notification, then ends the session
    when relayd's Engine.IO close arrives."""

    def __init__(self) -> None:
        self.got_close = asyncio.Event()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(OPEN)
        async for message in ws:
            if message.data == f"40{NS},":
                await ws.send_str(f'40{NS},{{"sid":"n1"}}')
            elif message.data == leave_packet(NS):
                # Sent before the server saw the leave, as far as the client can tell.
                await ws.send_str(f'42{NS},["notification",{{"seq":7}}]')
            elif message.data == "1":
                self.got_close.set()
                await ws.close()
        return ws


@pytest.fixture
async def server_url() -> AsyncIterator[tuple[str, LastWordServer]]:
    server = LastWordServer()
    app = web.Application()
    app.router.add_get("/socket.io/", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        await runner.cleanup()


async def test_a_socket_closed_at_a_switch_over_hands_on_what_came_before_the_leave(
    server_url: tuple[str, LastWordServer],
) -> None:
    url, server = server_url
    handed: list[Frame] = []

    async def on_event(frame: Frame) -> None:
        handed.append(frame)

    async with aiohttp.ClientSession() as session:
        sock = await PushSocket.connect(session, url, NS)
        await asyncio.wait_for(sock.close(5.0, drain=on_event), 10)
    assert [json.dumps(frame.args[1]) for frame in handed] == ['{"seq": 7}']
    assert server.got_close.is_set()  # the session was ended, not left to time out


async def test_a_plain_close_does_not_wait_for_the_server(
    server_url: tuple[str, LastWordServer],
) -> None:
    url, server = server_url
    async with aiohttp.ClientSession() as session:
        sock = await PushSocket.connect(session, url, NS)
        await asyncio.wait_for(sock.close(5.0), 10)
    assert not server.got_close.is_set()  # shutdown: leave and close, no Engine.IO close
