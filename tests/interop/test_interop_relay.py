"""relayd against the reference JavaScript Socket.IO server (npm socket.io v4).

Graph's push service speaks the JavaScript implementation's protocol, so the relay's client is
checked against that, not only against our Python emulator. A tiny stand-in for Graph's socketIo
endpoint hands out the JS server's notificationUrl.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from conftest import StartRelay, relay_config, seqs, wait_notifications
from jsserver import JsSocketIoServer
from support.waiting import wait_until

from relayd.emulator import WebhookReceiver


class EndpointStub:
    """Answers GET .../root/subscriptions/socketIo with a fixed notificationUrl, for drive `me`."""

    def __init__(self, notification_url: str) -> None:
        self.notification_url = notification_url
        self.requests = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def _endpoint(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response(
            {
                "id": f"sub-{self.requests}",
                "notificationUrl": self.notification_url,
                "expirationDateTime": "2999-01-01T00:00:00Z",
            }
        )

    async def _drive(self, request: web.Request) -> web.Response:
        return web.json_response({"id": "interop"})

    async def __aenter__(self) -> EndpointStub:
        app = web.Application()
        # relayd looks `me` up (/me/drive), then asks through the drive id, as Graph wants.
        app.router.add_get("/v1.0/me/drive", self._drive)
        app.router.add_get("/v1.0/drives/interop/root/subscriptions/socketIo", self._endpoint)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1.0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def js() -> AsyncIterator[JsSocketIoServer]:
    async with JsSocketIoServer(ping_interval_ms=1000, ping_timeout_ms=1000) as server:
        yield server


async def _start(
    tmp_path: Path, stub: EndpointStub, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    config = relay_config(tmp_path, stub, receiver)  # type: ignore[arg-type]
    await start_relay(config)


async def test_notifications_from_the_reference_server_are_relayed_in_order(
    tmp_path: Path, js: JsSocketIoServer, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    async with EndpointStub(js.notification_url()) as stub:
        await _start(tmp_path, stub, receiver, start_relay)
        await js.wait_clients(1)
        await js.emit(50)
        delivered = await wait_notifications(receiver, 50)
        assert sorted(seqs(delivered)) == list(range(1, 51))
        item = json.loads(delivered[0].body)["data"]["notification"]
        assert item["subscriptionId"] == "js-sub"  # passed through as received


async def test_reference_server_kick_and_bad_payload_are_survived(
    tmp_path: Path, js: JsSocketIoServer, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    async with EndpointStub(js.notification_url()) as stub:
        await _start(tmp_path, stub, receiver, start_relay)
        await js.wait_clients(1)
        await js.emit(raw="{not json")
        await js.kick()
        await wait_until(lambda: stub.requests == 2, what="fresh endpoint after kick")
        await js.wait_clients(1)
        await js.emit(1)
        assert seqs(await wait_notifications(receiver, 1)) == [1]


async def test_a_wrong_token_is_refused_and_retried(
    tmp_path: Path, js: JsSocketIoServer, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    wrong = js.notification_url().replace("token=js-token", "token=wrong")
    async with EndpointStub(wrong) as stub:
        await _start(tmp_path, stub, receiver, start_relay)
        await wait_until(lambda: stub.requests >= 2, what="retry after refusal")
        stub.notification_url = js.notification_url()
        await js.wait_clients(1, timeout=15)
