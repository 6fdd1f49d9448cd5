"""Tests of the JavaScript Socket.IO reference server helper, driven by python-socketio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsserver
import pytest
import socketio
from jsserver import JsServerError, JsSocketIoServer

NAMESPACE = "/notifications"
WAIT = 10.0


@pytest.fixture
async def js() -> AsyncIterator[JsSocketIoServer]:
    async with JsSocketIoServer() as server:
        yield server


def connect_url(js: JsSocketIoServer, token: str = "js-token") -> str:
    return f"http://127.0.0.1:{js.port}?token={token}&applicationId=js-app"


class Recorder:
    """Collects notifications and disconnects of one python-socketio client."""

    def __init__(self, client: socketio.AsyncClient, namespace: str = NAMESPACE) -> None:
        self.notifications: list[Any] = []
        self.expected = 0
        self.enough = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.disconnect_reasons: list[Any] = []
        self.connect_errors: list[Any] = []

        async def on_notification(*args: Any) -> None:
            self.notifications.append(args)
            if len(self.notifications) >= self.expected:
                self.enough.set()

        async def on_disconnect(reason: Any = None) -> None:
            self.disconnect_reasons.append(reason)
            self.disconnected.set()

        async def on_connect_error(data: Any = None) -> None:
            self.connect_errors.append(data)

        client.on("notification", on_notification, namespace=namespace)
        client.on("disconnect", on_disconnect, namespace=namespace)
        client.on("connect_error", on_connect_error, namespace=namespace)

    async def wait_for(self, n: int) -> None:
        self.expected = n
        if len(self.notifications) < n:
            self.enough.clear()
            await asyncio.wait_for(self.enough.wait(), WAIT)


@pytest.fixture
async def client() -> AsyncIterator[socketio.AsyncClient]:
    sio = socketio.AsyncClient(reconnection=False)
    try:
        yield sio
    finally:
        await sio.disconnect()
        await sio.shutdown()


async def test_notifications_arrive_as_json_strings_in_order(
    js: JsSocketIoServer, client: socketio.AsyncClient
) -> None:
    rec = Recorder(client)
    await client.connect(connect_url(js), namespaces=[NAMESPACE], transports=["websocket"])
    assert await js.clients() == 1

    result = await js.emit(50)
    assert result == {"emitted": 50, "sockets": 1, "last_seq": 50}
    await rec.wait_for(50)

    seqs = []
    for args in rec.notifications:
        assert len(args) == 1
        (payload,) = args
        assert isinstance(payload, str)  # Graph sends a JSON string: parse it a second time
        (item,) = json.loads(payload)["value"]
        assert item["subscriptionId"] == "js-sub"
        assert item["clientState"] == "system-managed:js"
        assert item["resource"] == "js-drive"
        assert item["tenantId"] == "js-tenant"
        seqs.append(item["relaydEmulatorSeq"])
    assert seqs == list(range(1, 51))

    # The sequence continues across calls.
    assert (await js.emit(2))["last_seq"] == 52
    await rec.wait_for(52)
    assert [json.loads(a[0])["value"][0]["relaydEmulatorSeq"] for a in rec.notifications[50:]] == [
        51,
        52,
    ]


async def test_raw_emit_is_delivered_verbatim(
    js: JsSocketIoServer, client: socketio.AsyncClient
) -> None:
    rec = Recorder(client)
    await client.connect(connect_url(js), namespaces=[NAMESPACE], transports=["websocket"])
    raw = '{"value": [{"resource": "a+b & c=d ü"}]}'
    assert await js.emit(count=5, raw=raw) == {"emitted": 1, "sockets": 1, "last_seq": 0}
    assert (await js.emit(1))["last_seq"] == 1
    await rec.wait_for(2)
    assert rec.notifications[0] == (raw,)
    assert json.loads(rec.notifications[1][0])["value"][0]["relaydEmulatorSeq"] == 1


async def test_wrong_token_is_refused(js: JsSocketIoServer, client: socketio.AsyncClient) -> None:
    rec = Recorder(client)
    with pytest.raises(socketio.exceptions.ConnectionError, match="namespaces failed"):
        await client.connect(
            connect_url(js, token="wrong"), namespaces=[NAMESPACE], transports=["websocket"]
        )
    assert rec.connect_errors == [{"message": "unauthorized"}]
    assert not client.connected
    assert await js.clients() == 0


async def test_missing_token_is_refused(js: JsSocketIoServer, client: socketio.AsyncClient) -> None:
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(
            f"http://127.0.0.1:{js.port}?applicationId=js-app",
            namespaces=[NAMESPACE],
            transports=["websocket"],
        )
    assert await js.clients() == 0


async def test_kick_disconnects_the_client(
    js: JsSocketIoServer, client: socketio.AsyncClient
) -> None:
    rec = Recorder(client)
    await client.connect(connect_url(js), namespaces=[NAMESPACE], transports=["websocket"])
    assert await js.kick() == 1
    await asyncio.wait_for(rec.disconnected.wait(), WAIT)
    assert rec.disconnect_reasons == [client.reason.SERVER_DISCONNECT]
    await js.wait_clients(0)
    assert await js.kick() == 0


async def test_polling_is_refused(js: JsSocketIoServer, client: socketio.AsyncClient) -> None:
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(connect_url(js), namespaces=[NAMESPACE], transports=["polling"])
    assert not client.connected
    assert await js.clients() == 0


async def test_url_as_is_joins_the_default_namespace_and_gets_nothing(
    js: JsSocketIoServer, client: socketio.AsyncClient
) -> None:
    # The pitfall from the notes: the URL's path is the namespace, not part of the address.
    await client.connect(js.notification_url(), transports=["websocket"])
    assert client.namespaces == {"/": client.get_sid("/")}
    assert await js.clients() == 0
    assert (await js.emit(1))["sockets"] == 0


async def test_wait_clients_and_several_clients(js: JsSocketIoServer) -> None:
    clients = [socketio.AsyncClient(reconnection=False) for _ in range(3)]
    recs = [Recorder(c) for c in clients]
    try:
        await asyncio.gather(
            *(
                c.connect(connect_url(js), namespaces=[NAMESPACE], transports=["websocket"])
                for c in clients
            )
        )
        await js.wait_clients(3)
        assert (await js.emit(4))["sockets"] == 3
        await asyncio.gather(*(r.wait_for(4) for r in recs))
        assert all(len(r.notifications) == 4 for r in recs)
        with pytest.raises(TimeoutError, match="last count 3"):
            await js.wait_clients(1, timeout=0.3)
    finally:
        for c in clients:
            await c.disconnect()
            await c.shutdown()
    await js.wait_clients(0)


async def test_ping_settings_reach_the_client() -> None:
    async with JsSocketIoServer(ping_interval_ms=300, ping_timeout_ms=400) as js:
        sio = socketio.AsyncClient(reconnection=False)
        rec = Recorder(sio)
        try:
            await sio.connect(connect_url(js), namespaces=[NAMESPACE], transports=["websocket"])
            # Engine.IO's open packet carries the server's settings, in seconds on the client.
            assert sio.eio.ping_interval == pytest.approx(0.3)
            assert sio.eio.ping_timeout == pytest.approx(0.4)
            # The connection survives several ping cycles (pings every 0.3 s; a missed pong
            # would close it 0.4 s later): no disconnect within 1.5 s, and it still delivers.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(rec.disconnected.wait(), 1.5)
            assert await js.clients() == 1
            await js.emit(1)
            await rec.wait_for(1)
        finally:
            await sio.disconnect()
            await sio.shutdown()


async def test_custom_namespace_token_and_query_key() -> None:
    async with JsSocketIoServer(namespace="/zbaehwg", token="s3cr3t", query_key="snthgk") as js:
        assert js.notification_url() == (
            f"http://127.0.0.1:{js.port}/zbaehwg?snthgk=s3cr3t&applicationId=js-app"
        )
        sio = socketio.AsyncClient(reconnection=False)
        rec = Recorder(sio, namespace="/zbaehwg")
        try:
            await sio.connect(
                f"http://127.0.0.1:{js.port}?{js.query}",
                namespaces=["/zbaehwg"],
                transports=["websocket"],
            )
            await js.emit(1)
            await rec.wait_for(1)
        finally:
            await sio.disconnect()
            await sio.shutdown()


async def test_server_start_failure_reports_node_stderr() -> None:
    server = JsSocketIoServer(token="")
    server.query_key = ""  # server.js rejects an empty --query-key and exits 2
    with pytest.raises(JsServerError, match=r"exit code 2[\s\S]*query-key"):
        async with server:
            pass


async def test_stop_is_clean(js: JsSocketIoServer) -> None:
    await js.__aexit__(None, None, None)
    assert js.returncode == 0
    assert "shutting down" in js.stderr_text()


async def test_missing_node_modules_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(jsserver, "SOCKET_IO_PACKAGE", tmp_path / "socket.io" / "package.json")
    with pytest.raises(JsServerError, match=r"npm ci --prefix tests/interop"):
        async with JsSocketIoServer():
            pass
