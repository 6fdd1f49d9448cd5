"""The Graph emulator answers like Graph and pushes like Graph's socketIo service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import socketio
from support.waiting import wait_until

from relayd.emulator import GraphEmulator

AUTH = {"Authorization": "Bearer test-token"}
SITE = (  # a SharePoint site id: host, site collection id, web id, joined by commas
    "contoso.sharepoint.com,1b2c3d4e-0000-1111-2222-333344445555,9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"
)

FORMS = [
    ("/me/drive/root/subscriptions/socketIo", "me"),
    ("/drives/b!AbC-123_x/root/subscriptions/socketIo", "drives/b!AbC-123_x"),
    ("/groups/0f0e0d0c-1111/drive/root/subscriptions/socketIo", "groups/0f0e0d0c-1111"),
    (
        f"/sites/{SITE}/lists/5a5b5c5d-6666/drive/root/subscriptions/socketIo",
        f"sites/{SITE}/lists/5a5b5c5d-6666",
    ),
]
ENDPOINT = {resource: path for path, resource in FORMS}
GRAPH_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?Z$")


async def subscribe(
    http: aiohttp.ClientSession, emu: GraphEmulator, resource: str = "me"
) -> dict[str, Any]:
    async with http.get(emu.base_url + ENDPOINT[resource], headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


def socket_target(notification_url: str) -> tuple[str, str]:
    """(server url for python-socketio, namespace) for a notificationUrl, in either form."""
    parts = urlsplit(notification_url)
    namespace = parts.path.removesuffix("/callback")
    return f"{parts.scheme}://{parts.netloc}?{parts.query}", namespace


class Listener:
    """A python-socketio client that records the `notification` events it hears."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.client = socketio.AsyncClient(reconnection=False)
        self.events: list[Any] = []
        self.disconnected = asyncio.Event()
        self.client.on("notification", self.events.append, namespace=namespace)
        self.client.on("disconnect", self._on_disconnect, namespace=namespace)

    def _on_disconnect(self, reason: Any = None) -> None:
        self.disconnected.set()

    async def connect(self, server_url: str, transport: str = "websocket") -> None:
        await self.client.connect(server_url, namespaces=[self.namespace], transports=[transport])


@contextlib.asynccontextmanager
async def listening(notification_url: str) -> AsyncIterator[Listener]:
    server_url, namespace = socket_target(notification_url)
    listener = Listener(namespace)
    await listener.connect(server_url)
    try:
        yield listener
    finally:
        await listener.client.disconnect()


@pytest.mark.parametrize(("path", "resource"), FORMS)
async def test_endpoint_answers_graphs_shape(
    http: aiohttp.ClientSession, emulator: GraphEmulator, path: str, resource: str
) -> None:
    before = datetime.now(UTC)
    async with http.get(emulator.base_url + path, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()

    assert set(body) == {
        "@odata.context",
        "clientState",
        "expirationDateTime",
        "id",
        "notificationUrl",
    }
    assert body["@odata.context"] == f"{emulator.base_url}/$metadata#subscriptions/$entity"
    assert body["clientState"].startswith("system-managed:")
    uuid.UUID(body["id"])
    assert GRAPH_TIME.match(body["expirationDateTime"])
    expires = datetime.fromisoformat(body["expirationDateTime"].replace("Z", "+00:00"))
    assert 3590 < (expires - before).total_seconds() < 3610
    url = urlsplit(body["notificationUrl"])
    assert (url.scheme, url.netloc, url.path) == (
        "http",
        f"127.0.0.1:{emulator.port}",
        "/notifications",
    )
    query = parse_qs(url.query)
    assert set(query) == {"token", "applicationId"}
    assert emulator.endpoint_requests[resource] == 1


async def test_each_request_creates_a_new_subscription(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    first, second = await subscribe(http, emulator), await subscribe(http, emulator)
    assert first["id"] != second["id"]
    assert first["notificationUrl"] != second["notificationUrl"]
    secrets = emulator.issued_secrets()
    assert len(secrets) == 2
    for body, secret in zip((first, second), secrets, strict=True):
        assert parse_qs(urlsplit(body["notificationUrl"]).query)["token"] == [secret]


async def test_percent_encoded_site_id_is_the_same_drive(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    path = f"/sites/{SITE.replace(',', '%2C')}/lists/L1/drive/root/subscriptions/socketIo"
    async with http.get(emulator.base_url + path, headers=AUTH) as resp:
        assert resp.status == 200
    assert emulator.endpoint_requests[f"sites/{SITE}/lists/L1"] == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "x"}])
async def test_bad_token_is_401_with_graph_error_body(
    http: aiohttp.ClientSession, emulator: GraphEmulator, headers: dict[str, str]
) -> None:
    async with http.get(emulator.base_url + ENDPOINT["me"], headers=headers) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["code"] == "InvalidAuthenticationToken"
    assert body["error"]["message"]
    assert emulator.endpoint_requests["me"] == 1


async def test_tokens_can_be_accepted_and_revoked(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    url = emulator.base_url + ENDPOINT["me"]
    emulator.accept_token("fresh")
    async with http.get(url, headers={"Authorization": "Bearer fresh"}) as resp:
        assert resp.status == 200
    emulator.revoke_token("test-token")
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status == 401


async def test_injected_errors_are_answered_then_consumed(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    emulator.inject_error("me", 429, "TooManyRequests", retry_after=1.2, count=2)
    emulator.inject_error("me", 400, "notSupported")
    url = emulator.base_url + ENDPOINT["me"]
    for _ in range(2):
        async with http.get(url, headers=AUTH) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "2"  # whole seconds, rounded up
            assert (await resp.json())["error"]["code"] == "TooManyRequests"
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status == 400
        assert "Retry-After" not in resp.headers
        assert (await resp.json())["error"]["code"] == "notSupported"
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status == 200
    assert emulator.endpoint_requests["me"] == 4


async def test_throttles_answer_any_route_of_a_tenant_and_every_request_is_logged(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    emulator.accept_token("contoso-token", tenant="contoso")
    contoso = {"Authorization": "Bearer contoso-token"}
    emulator.throttle(retry_after=4, tenant="contoso", count=2)
    delta = emulator.base_url + "/drives/x/root/delta?token=latest"
    for url in (delta, emulator.base_url + ENDPOINT["me"]):  # any route
        async with http.get(url, headers=contoso) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "4"
    async with http.get(delta, headers=AUTH) as resp:  # another tenant's token: not throttled
        assert resp.status == 200
    async with http.get(delta, headers=contoso) as resp:  # both throttles used up
        assert resp.status == 200
    assert [(r.resource, r.tenant) for r in emulator.requests] == [
        ("drives/x", "contoso"),
        ("me", "contoso"),
        ("drives/x", None),
        ("drives/x", "contoso"),
    ]
    assert [r.at for r in emulator.requests] == sorted(r.at for r in emulator.requests)
    assert len(emulator.requests_of("contoso")) == 3


async def test_errors_are_per_drive(http: aiohttp.ClientSession, emulator: GraphEmulator) -> None:
    emulator.inject_error("drives/b!AbC-123_x", 503, "serviceNotAvailable")
    await subscribe(http, emulator, "me")  # not affected
    async with http.get(emulator.base_url + ENDPOINT["drives/b!AbC-123_x"], headers=AUTH) as resp:
        assert resp.status == 503


async def test_socket_receives_notifications_in_order_as_json_strings(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    sub = await subscribe(http, emulator)
    async with listening(sub["notificationUrl"]) as listener:
        assert emulator.connected("me") == 1
        assert emulator.connects["me"] == 1
        assert await emulator.emit("me", 5) == 5
        await wait_until(lambda: len(listener.events) == 5)

    items = []
    for event in listener.events:
        assert isinstance(event, str)  # Graph sends a JSON string, parsed a second time
        (item,) = json.loads(event)["value"]
        items.append(item)
    assert [i["relaydEmulatorSeq"] for i in items] == [1, 2, 3, 4, 5]
    first = items[0]
    assert first["subscriptionId"] == sub["id"]
    assert first["clientState"] == sub["clientState"]
    assert first["expirationDateTime"] == sub["expirationDateTime"]
    assert {"resource", "tenantId", "siteUrl", "webId"} <= set(first)
    assert len({i["resource"] for i in items}) == 1
    assert emulator.emitted["me"] == 5


async def test_notifications_only_reach_their_drive(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    mine = await subscribe(http, emulator, "me")
    other = await subscribe(http, emulator, "drives/b!AbC-123_x")
    async with listening(mine["notificationUrl"]) as me, listening(other["notificationUrl"]) as it:
        assert await emulator.emit("drives/b!AbC-123_x") == 1
        await wait_until(lambda: len(it.events) == 1)
        assert await emulator.emit("me") == 1
        await wait_until(lambda: len(me.events) == 1)
    assert len(it.events) == 1
    assert emulator.emitted == {"me": 1, "drives/b!AbC-123_x": 1}


async def test_emit_without_listeners_still_counts(emulator: GraphEmulator) -> None:
    assert await emulator.emit("me", 3) == 0
    assert emulator.emitted["me"] == 3


async def test_raw_emit_sends_the_value_as_is(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    sub = await subscribe(http, emulator)
    async with listening(sub["notificationUrl"]) as listener:
        for raw in ("not json", {"value": "a dict"}, 42):
            assert await emulator.emit("me", raw=raw) == 1
        await wait_until(lambda: len(listener.events) == 3)
    assert listener.events == ["not json", {"value": "a dict"}, 42]
    assert "me" not in emulator.emitted


async def test_callback_form_uses_its_namespace(http: aiohttp.ClientSession) -> None:
    async with GraphEmulator(url_form="callback") as emu:
        sub = await subscribe(http, emu)
        url = urlsplit(sub["notificationUrl"])
        assert url.path == "/zbaehwg/callback"
        assert set(parse_qs(url.query)) == {"snthgk"}
        async with listening(sub["notificationUrl"]) as listener:
            assert listener.namespace == "/zbaehwg"
            await emu.emit("me")
            await wait_until(lambda: len(listener.events) == 1)
        # The same secret is no good in the other namespace.
        wrong = Listener("/notifications")
        with pytest.raises(socketio.exceptions.ConnectionError):
            await wrong.connect(socket_target(sub["notificationUrl"])[0])
        await wrong.client.disconnect()


async def test_push_base_url_names_another_host(http: aiohttp.ClientSession) -> None:
    async with GraphEmulator(push_base_url="http://push.example:1234/") as emu:
        sub = await subscribe(http, emu)
    assert sub["notificationUrl"].startswith("http://push.example:1234/notifications?token=")


@pytest.mark.parametrize(
    "query", ["token=bogus&applicationId=x", "applicationId=x", "snthgk=bogus", ""]
)
async def test_unknown_token_is_refused(emulator: GraphEmulator, query: str) -> None:
    listener = Listener("/notifications")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await listener.connect(f"http://127.0.0.1:{emulator.port}?{query}")
    await listener.client.disconnect()
    assert emulator.connects["me"] == 0


async def test_polling_transport_is_refused(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    sub = await subscribe(http, emulator)
    server_url, namespace = socket_target(sub["notificationUrl"])
    listener = Listener(namespace)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await listener.connect(server_url, transport="polling")
    await listener.client.disconnect()
    # And at the HTTP level, the Engine.IO polling handshake itself is rejected.
    query = urlsplit(sub["notificationUrl"]).query
    async with http.get(
        f"http://127.0.0.1:{emulator.port}/socket.io/?EIO=4&transport=polling&{query}"
    ) as resp:
        assert resp.status == 400
    assert emulator.connects["me"] == 0


async def test_kick_disconnects_but_the_subscription_stays_good(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    sub = await subscribe(http, emulator)
    async with listening(sub["notificationUrl"]) as listener:
        assert await emulator.kick("me") == 1
        await asyncio.wait_for(listener.disconnected.wait(), 5)
        await wait_until(lambda: not listener.client.connected)
        assert emulator.connected("me") == 0
    async with listening(sub["notificationUrl"]) as again:
        await emulator.emit("me")
        await wait_until(lambda: len(again.events) == 1)
    assert emulator.connects["me"] == 2
    await wait_until(lambda: emulator.connected("me") == 0)  # the client's own goodbye
    assert await emulator.kick("me") == 0


async def test_expire_close_disconnects_and_refuses_the_old_token(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    old = await subscribe(http, emulator)
    async with listening(old["notificationUrl"]) as listener:
        await emulator.expire("me")
        await asyncio.wait_for(listener.disconnected.wait(), 5)
    assert emulator.connected("me") == 0
    server_url, namespace = socket_target(old["notificationUrl"])
    stale = Listener(namespace)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await stale.connect(server_url)
    await stale.client.disconnect()
    new = await subscribe(http, emulator)
    async with listening(new["notificationUrl"]) as listener:
        assert await emulator.emit("me") == 1
        await wait_until(lambda: len(listener.events) == 1)


@contextlib.asynccontextmanager
async def raw_engineio(
    http: aiohttp.ClientSession, notification_url: str
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A bare Engine.IO 4 websocket joined to the notificationUrl's namespace, frames in view."""
    parts = urlsplit(notification_url)
    namespace = parts.path.removesuffix("/callback")
    url = f"ws://{parts.netloc}/socket.io/?EIO=4&transport=websocket&{parts.query}"
    async with http.ws_connect(url) as ws:
        opening = await ws.receive_str(timeout=5)
        assert opening.startswith("0{")
        await ws.send_str(f"40{namespace},")
        joined = await ws.receive_str(timeout=5)
        assert joined.startswith(f"40{namespace},{{"), joined
        yield ws


async def next_frame(ws: aiohttp.ClientWebSocketResponse) -> str:
    """The next Engine.IO frame that is not a ping; pings are answered on the way."""
    while True:
        frame = await ws.receive_str(timeout=5)
        if frame != "2":
            return frame
        await ws.send_str("3")


async def test_notification_frame_is_what_graph_sends(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    sub = await subscribe(http, emulator)
    async with raw_engineio(http, sub["notificationUrl"]) as ws:
        await emulator.emit("me")
        frame = await next_frame(ws)
    prefix = '42/notifications,["notification","'
    assert frame.startswith(prefix), frame
    event, payload = json.loads(frame.removeprefix("42/notifications,"))
    assert event == "notification"
    assert json.loads(payload)["value"][0]["subscriptionId"] == sub["id"]


async def test_expire_quiet_keeps_the_socket_but_sends_nothing(
    http: aiohttp.ClientSession,
) -> None:
    async with GraphEmulator(expiry="quiet", ping_interval=0.2, ping_timeout=0.5) as emu:
        old = await subscribe(http, emu)
        async with raw_engineio(http, old["notificationUrl"]) as quiet:
            await emu.expire("me")
            assert await emu.emit("me") == 0
            new = await subscribe(http, emu)
            async with listening(new["notificationUrl"]) as fresh:
                assert await emu.emit("me") == 1
                await wait_until(lambda: len(fresh.events) == 1)
                assert emu.connected("me") == 2
                assert emu.connected("me", include_expired=False) == 1
                assert emu.peak_connected["me"] == 2  # both at once, and counted so
            # Pings go on, and nothing else arrives: three rounds of them, answered.
            for _ in range(3):
                assert await quiet.receive_str(timeout=5) == "2"
                await quiet.send_str("3")
            assert not quiet.closed
        # An expired subscription's token still connects in quiet mode, and stays silent.
        async with raw_engineio(http, old["notificationUrl"]) as again:
            assert await emu.emit("me") == 0
            assert await again.receive_str(timeout=5) == "2"
    assert json.loads(fresh.events[0])["value"][0]["relaydEmulatorSeq"] == 2


async def test_short_lifetime_expires_on_its_own(http: aiohttp.ClientSession) -> None:
    async with GraphEmulator(lifetime=0.5) as emu:
        sub = await subscribe(http, emu)
        started = time.monotonic()
        async with listening(sub["notificationUrl"]) as listener:
            await asyncio.wait_for(listener.disconnected.wait(), 5)
        assert time.monotonic() - started < 3
        emu.set_lifetime(3600)
        longer = await subscribe(http, emu)
        expires = datetime.fromisoformat(longer["expirationDateTime"].replace("Z", "+00:00"))
        assert (expires - datetime.now(UTC)).total_seconds() > 3500


async def test_fractional_ping_interval_is_announced_exactly(
    http: aiohttp.ClientSession,
) -> None:
    async with GraphEmulator(ping_interval=0.5, ping_timeout=0.25) as emu:
        sub = await subscribe(http, emu)
        async with listening(sub["notificationUrl"]) as listener:
            assert listener.client.eio.ping_interval == 0.5
            assert listener.client.eio.ping_timeout == 0.25


async def test_root_namespace_is_accepted_and_silent(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    sub = await subscribe(http, emulator)
    server_url, _ = socket_target(sub["notificationUrl"])
    wrong = Listener("/")  # the classic mistake: the URL's path dropped, namespace "/" joined
    await wrong.connect(server_url)
    try:
        assert wrong.client.connected
        assert await emulator.emit("me") == 0
        assert emulator.connected("me") == 0
    finally:
        await wrong.client.disconnect()


async def test_control_api_drives_the_emulator(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    control = f"http://127.0.0.1:{emulator.port}/_emulator"
    sub = await subscribe(http, emulator)
    async with listening(sub["notificationUrl"]) as listener:
        async with http.post(f"{control}/emit", params={"resource": "me", "count": "2"}) as r:
            assert r.status == 200
            assert await r.json() == {"reached": 2}
        await wait_until(lambda: len(listener.events) == 2)
        async with http.get(f"{control}/state") as r:
            assert await r.json() == {
                "me": {
                    "connected": 1,
                    "endpoint_requests": 1,
                    "connects": 1,
                    "peak_connected": 1,
                    "emitted": 2,
                    "drive_lookups": 0,
                }
            }
        async with http.post(f"{control}/kick", params={"resource": "me"}) as r:
            assert await r.json() == {"kicked": 1}
        await asyncio.wait_for(listener.disconnected.wait(), 5)
    async with listening(sub["notificationUrl"]) as listener:
        async with http.post(f"{control}/expire", params={"resource": "me"}) as r:
            assert r.status == 200
        await asyncio.wait_for(listener.disconnected.wait(), 5)
    params = {"resource": "me", "status": "429", "code": "TooManyRequests", "retry_after": "3"}
    async with http.post(f"{control}/error", params=params) as r:
        assert r.status == 200
    async with http.get(emulator.base_url + ENDPOINT["me"], headers=AUTH) as r:
        assert (r.status, r.headers["Retry-After"]) == (429, "3")
    async with http.post(f"{control}/emit") as r:
        assert r.status == 400  # no resource


async def test_stop_closes_sockets_and_is_idempotent(http: aiohttp.ClientSession) -> None:
    emu = GraphEmulator(ping_interval=0.2, ping_timeout=0.2)
    await emu.start()
    sub = await subscribe(http, emu)
    async with listening(sub["notificationUrl"]) as listener:
        started = time.monotonic()
        await emu.stop()
        assert time.monotonic() - started < 2
        await asyncio.wait_for(listener.disconnected.wait(), 5)
    await emu.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await subscribe(http, emu)


async def test_module_entry_point_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd.emulator.graph",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        match = re.fullmatch(r"listening (http://127\.0\.0\.1:\d+/v1\.0)\n", line)
        assert match, line
        async with aiohttp.ClientSession() as http:
            url = match.group(1) + ENDPOINT["me"]
            async with http.get(url, headers=AUTH) as resp:
                assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert stderr == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_announced_ping_times_can_differ_from_the_real_ones(
    http: aiohttp.ClientSession,
) -> None:
    # A server that says "a ping a day" and pings every 0.2 s: what relays must not trust.
    async with GraphEmulator(
        ping_interval=0.2,
        ping_timeout=0.5,
        announced_ping_interval=86_400,
        announced_ping_timeout=3_600,
    ) as emu:
        sub = await subscribe(http, emu)
        parts = urlsplit(sub["notificationUrl"])
        url = f"ws://{parts.netloc}/socket.io/?EIO=4&transport=websocket&{parts.query}"
        async with http.ws_connect(url) as ws:
            opening = json.loads((await ws.receive_str(timeout=5)).removeprefix("0"))
            assert (opening["pingInterval"], opening["pingTimeout"]) == (86_400_000, 3_600_000)
            assert await ws.receive_str(timeout=2) == "2"  # pinged at the real interval


async def test_a_drive_answers_to_its_id_and_me_can_be_refused_like_some_business_tenants(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    async with http.get(f"{emulator.base_url}/me/drive?$select=id", headers=AUTH) as r:
        assert r.status == 200
        drive_id = (await r.json())["id"]
    assert drive_id == emulator.drive_id("me")
    assert emulator.drive_lookups == {"me": 1}
    async with http.get(
        f"{emulator.base_url}/drives/{drive_id}/root/subscriptions/socketIo", headers=AUTH
    ) as r:
        assert r.status == 200
        by_id = await r.json()
    emulator.me_not_supported = True
    async with http.get(emulator.base_url + ENDPOINT["me"], headers=AUTH) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "notSupported"
    # `me` and `drives/{its id}` are one drive: a notification for one reaches the other's socket.
    async with listening(by_id["notificationUrl"]) as listener:
        await wait_until(lambda: emulator.connected("me") == 1)
        assert await emulator.emit("me") == 1
        await wait_until(lambda: len(listener.events) == 1)
    assert emulator.endpoint_requests["me"] == 2  # counted under the name it was first used by


async def test_sites_and_groups_made_over_the_control_api_are_listed_in_pages(
    http: aiohttp.ClientSession, emulator: GraphEmulator
) -> None:
    control = f"http://127.0.0.1:{emulator.port}/_emulator"
    params = {"name": "Engineering", "libraries": "Documents,Specs,Archive"}
    async with http.post(f"{control}/site", params=params) as r:
        site = await r.json()
    async with http.post(f"{control}/group", params={"name": "Rocket", "team": "1"}) as r:
        group = await r.json()
    assert group["drive_id"] == emulator.drive_id(group["resource"])

    drives: list[str] = []
    url: str | None = f"{emulator.base_url}/sites/{site['id']}/drives"
    while url is not None:
        async with http.get(url, headers=AUTH) as r:
            page = await r.json()
        assert len(page["value"]) <= 2
        drives += [f"drives/{drive['id']}" for drive in page["value"]]
        url = page.get("@odata.nextLink")
    assert drives == site["drives"]
    async with http.get(f"{emulator.base_url}/me/joinedTeams", headers=AUTH) as r:
        assert [team["displayName"] for team in (await r.json())["value"]] == ["Rocket"]
