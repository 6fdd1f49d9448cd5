"""The Graph emulator over TLS: https:// for Graph, wss:// for the push service, a test CA."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import socketio
from support.tls import Authority
from support.waiting import wait_until

from relayd.emulator import GraphEmulator

AUTH = {"Authorization": "Bearer test-token"}
ENDPOINT = "/me/drive/root/subscriptions/socketIo"


def trusting(context: ssl.SSLContext) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))


async def test_graph_is_served_over_https_with_a_certificate_from_the_test_ca(
    ca: Authority, tls_emulator: GraphEmulator
) -> None:
    assert tls_emulator.base_url.startswith("https://127.0.0.1:")
    async with (
        trusting(ca.issuer.client_context()) as http,
        http.get(tls_emulator.base_url + ENDPOINT, headers=AUTH) as response,
    ):
        assert response.status == 200
        body = json.loads(await response.text())
    # The push service is on the same TLS port: the notificationUrl is https as well.
    assert body["notificationUrl"].startswith(f"https://127.0.0.1:{tls_emulator.port}/")


async def test_a_client_without_the_ca_is_refused_by_certificate_verification(
    tls_emulator: GraphEmulator,
) -> None:
    async with trusting(ssl.create_default_context()) as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(tls_emulator.base_url + ENDPOINT, headers=AUTH)
    assert tls_emulator.endpoint_requests["me"] == 0


async def test_notifications_are_pushed_over_wss(
    ca: Authority, tls_emulator: GraphEmulator
) -> None:
    async with trusting(ca.issuer.client_context()) as http:
        async with http.get(tls_emulator.base_url + ENDPOINT, headers=AUTH) as response:
            url = urlsplit((await response.json(content_type=None))["notificationUrl"])
        heard: list[object] = []
        client = socketio.AsyncClient(reconnection=False, http_session=http)
        client.on("notification", heard.append, namespace=url.path)
        await client.connect(
            f"{url.scheme}://{url.netloc}?{url.query}",
            namespaces=[url.path],
            transports=["websocket"],
            wait_timeout=5,
        )
        try:
            assert client.transport() == "websocket"
            await wait_until(lambda: tls_emulator.connected("me") == 1, what="connected")
            await tls_emulator.emit("me")
            await wait_until(lambda: len(heard) == 1, what="a notification over wss")
        finally:
            await client.disconnect()


@pytest.mark.timeout(30)
async def test_standalone_emulator_serves_tls_and_writes_its_ca(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd.emulator.graph",
        "--tls-ca-out",
        str(ca_file),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith("listening https://127.0.0.1:"), line
        base_url = line.split()[1]
        context = ssl.create_default_context(cafile=str(ca_file))
        async with trusting(context) as http, http.get(base_url + ENDPOINT, headers=AUTH) as got:
            assert got.status == 200
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
