"""A drive's connection over its life: forms, renewals, reconnects, errors, bad payloads.

Everything runs against the Graph emulator over loopback sockets, with the real supervisor and
SQLite outbox; the receiver sees what a user's webhook would.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from conftest import TOKEN, StartRelay, relay_config, seqs, wait_notifications
from support.proxy import FreezableProxy
from support.waiting import stays_true, wait_until

from relayd import watcher
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.watcher import DriveState

SITE = "contoso.sharepoint.com,1b2c3d4e-0000-1111-2222-333344445555,9f8e7d6c-aaaa-bbbb"


def drive(name: str, resource: str, webhook: str | list[str] = "hook") -> dict[str, object]:
    return {"name": name, "account": "test", "resource": resource, "webhook": webhook}


@pytest.mark.parametrize(
    "resource",
    [
        "me",
        "drives/b!abc123",
        "groups/0d8a2a5e-0000-4a2b-9c1e-1234567890ab",
        f"sites/{SITE}/lists/L1",
    ],
)
async def test_every_resource_form_is_watched(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay, resource: str
) -> None:
    await start_relay(drives=[drive("d1", resource)])
    await wait_until(lambda: emulator.connected(resource) == 1, what="connected")
    await emulator.emit(resource, 3)
    delivered = await wait_notifications(receiver, 3)
    assert seqs(delivered) == [1, 2, 3]
    assert {r.json()["data"]["resource"] for r in delivered} == {resource}


@pytest.fixture
async def callback_emulator() -> AsyncIterator[GraphEmulator]:
    async with GraphEmulator(tokens=[TOKEN], url_form="callback") as graph:
        yield graph


async def test_older_callback_url_form_is_followed(
    tmp_path: Path,
    callback_emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
) -> None:
    await start_relay(relay_config(tmp_path, callback_emulator, receiver))
    await wait_until(lambda: callback_emulator.connected("me") == 1, what="connected")
    await callback_emulator.emit("me", 2)
    assert seqs(await wait_notifications(receiver, 2)) == [1, 2]


async def test_kicked_connection_comes_back_with_a_fresh_endpoint(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    await relay.connected()
    await emulator.emit("me")
    await wait_notifications(receiver, 1)
    await emulator.kick("me")
    await wait_until(
        lambda: emulator.connects["me"] == 2 and emulator.connected("me") == 1, what="reconnected"
    )
    assert emulator.endpoint_requests["me"] == 2  # a fresh endpoint, not the old URL again
    await emulator.emit("me")
    assert seqs(await wait_notifications(receiver, 2)) == [1, 2]
    assert relay.watcher().status.reconnects == 1
    await wait_until(
        lambda: relay.watcher().status.state is DriveState.CONNECTED, what="state connected"
    )


@pytest.mark.parametrize("behaviour", ["close", "quiet"])
async def test_renewal_before_a_short_expiry_loses_nothing(
    tmp_path: Path, receiver: WebhookReceiver, start_relay: StartRelay, behaviour: str
) -> None:
    # A 12 s lifetime renews at half-life (6 s), not "two minutes early" (which would be a loop).
    async with GraphEmulator(tokens=[TOKEN], lifetime=12, expiry=behaviour) as graph:  # type: ignore[arg-type]
        relay = await start_relay(relay_config(tmp_path, graph, receiver))
        await wait_until(lambda: graph.connected("me") == 1, what="connected")
        started = time.monotonic()
        sent = 0
        # Emit steadily across two renewals; every one must arrive exactly once.
        while relay.watcher().status.renewals < 2:
            assert time.monotonic() - started < 30, "no renewal within 30 s"
            await graph.emit("me")
            sent += 1
            await wait_until(lambda n=sent: len(receiver.delivered("hook")) == n, what="delivery")
        assert seqs(receiver.delivered("hook")) == list(range(1, sent + 1))
        assert graph.endpoint_requests["me"] == 3
        assert relay.watcher().status.reconnects == 0  # make before break: never disconnected
        assert 10 < time.monotonic() - started < 20  # renewed at ~6 s each, not at 12 or 0


async def test_expired_and_closed_connection_is_replaced(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    await relay.connected()
    await emulator.expire("me")
    await wait_until(lambda: emulator.connects["me"] == 2, what="reconnected after expiry")
    await wait_until(lambda: emulator.connected("me", include_expired=False) == 1, what="live")
    await emulator.emit("me")
    assert seqs(await wait_notifications(receiver, 1)) == [1]


async def test_silence_past_ping_timeout_means_reconnect(
    tmp_path: Path, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    async with GraphEmulator(tokens=[TOKEN], ping_interval=0.5, ping_timeout=0.5) as graph:  # noqa: SIM117 - the proxy needs graph.port
        async with FreezableProxy(graph.port) as proxy:
            # Everything, Graph and push service, goes through a proxy that can go silent.
            graph.push_base_url = f"http://127.0.0.1:{proxy.port}"
            proxied = {"base_url": f"http://127.0.0.1:{proxy.port}/v1.0"}
            relay = await start_relay(relay_config(tmp_path, graph, receiver, graph=proxied))
            await relay.connected()
            proxy.freeze()  # no close, no ping: just silence
            await wait_until(
                lambda: relay.watcher().status.reconnects == 1, timeout=5, what="silence noticed"
            )
            proxy.thaw()
            await wait_until(
                lambda: (
                    relay.watcher().status.state is DriveState.CONNECTED
                    and graph.connected("me", include_expired=False) >= 1
                ),
                what="reconnected",
            )
            await wait_until(lambda: graph.connects["me"] >= 2, what="second connect")
            await graph.emit("me")
            assert seqs(await wait_notifications(receiver, 1)) == [1]


async def test_a_quiet_connection_answers_pings_and_stays_up(
    tmp_path: Path, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    # Pings every 0.5 s, 0.5 s to answer: a missed pong ends the connection within a second. Seven
    # seconds of nothing else also outlast python-engineio's own write loop, which gave up after
    # a ping interval plus five seconds with nothing queued (pongs no longer pass through it).
    async with GraphEmulator(tokens=[TOKEN], ping_interval=0.5, ping_timeout=0.5) as graph:
        relay = await start_relay(relay_config(tmp_path, graph, receiver))
        await relay.connected()
        await stays_true(
            lambda: (
                relay.watcher().status.state is DriveState.CONNECTED and graph.connects["me"] == 1
            ),
            seconds=7,
            what="the first connection",
        )
        await graph.emit("me")
        assert seqs(await wait_notifications(receiver, 1)) == [1]
        assert relay.watcher().status.reconnects == 0


async def test_401_refreshes_the_token_once_and_carries_on(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    counter = tmp_path / "calls"
    command = (
        f"python3 -c \"import pathlib; p = pathlib.Path('{counter}');"
        f" p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else '1');"
        f" print('{TOKEN}')\""
    )
    config = relay_config(tmp_path, emulator, receiver)
    accounts = {
        "test": config.accounts["test"].model_copy(
            update={"token_command": command, "token_file": None}
        )
    }
    emulator.inject_error("me", 401, "InvalidAuthenticationToken")
    await start_relay(config.model_copy(update={"accounts": accounts}))
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    assert emulator.endpoint_requests["me"] == 2  # refused once, then accepted
    assert counter.read_text() == "2"  # the command ran again after the 401


async def test_throttling_honours_retry_after(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    emulator.inject_error("me", 429, "TooManyRequests", retry_after=2)
    started = time.monotonic()
    relay = await start_relay()
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    assert time.monotonic() - started >= 2
    assert emulator.endpoint_requests["me"] == 2
    await wait_until(
        lambda: relay.watcher().status.state is DriveState.CONNECTED, what="state connected"
    )


async def test_service_unavailable_is_retried(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    emulator.inject_error("me", 503, "serviceNotAvailable", count=2)
    await start_relay()
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    assert emulator.endpoint_requests["me"] == 3


async def test_not_supported_drive_is_reported_and_others_carry_on(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    emulator.inject_error("drives/unsupported", 400, "notSupported", count=100)
    relay = await start_relay(drives=[drive("bad", "drives/unsupported"), drive("good", "me")])
    await wait_until(
        lambda: relay.watcher("bad").status.state is DriveState.NOT_SUPPORTED, what="reported"
    )
    assert "notSupported" in (relay.watcher("bad").status.last_error or "")
    await wait_until(lambda: emulator.connected("me") == 1, what="good drive connected")
    await emulator.emit("me")
    assert seqs(await wait_notifications(receiver, 1)) == [1]
    assert emulator.endpoint_requests["drives/unsupported"] == 1  # asked again only much later


async def test_malformed_events_are_counted_and_the_next_good_one_flows(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    for raw in [
        "not json",
        {"value": []},
        42,
        '{"novalue": 1}',
        '{"value": [1]}',
        '{"value": [' + '"x",' * 400_000 + '"x"]}',
    ]:
        await emulator.emit("me", raw=raw)
    await emulator.emit("me")
    assert seqs(await wait_notifications(receiver, 1)) == [1]
    status = relay.watcher().status
    assert status.malformed == 6
    assert status.received == 1
    assert status.reconnects == 0


async def test_order_is_kept_per_drive(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    webhooks = {
        "hook": {
            "url": receiver.url("hook"),
            "ordered": True,
            "retry": {"initial_delay": 0.05, "max_delay": 0.2},
        }
    }
    await start_relay(webhooks=webhooks)
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    await emulator.emit("me", 100)
    assert seqs(await wait_notifications(receiver, 100)) == list(range(1, 101))


async def test_a_burst_of_200_is_delivered_in_full(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    await start_relay()
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    await emulator.emit("me", 200)
    delivered = await wait_notifications(receiver, 200, timeout=20)
    assert sorted(seqs(delivered)) == list(range(1, 201))
    assert len({r.headers["webhook-id"] for r in delivered}) == 200


async def test_a_drive_with_several_webhooks_posts_to_each(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    fast = {"initial_delay": 0.05, "max_delay": 0.2}
    webhooks = {
        "a": {"url": receiver.url("a"), "retry": fast},
        "b": {"url": receiver.url("b"), "retry": fast},
    }
    await start_relay(webhooks=webhooks, drives=[drive("d1", "me", ["a", "b"])])
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    await emulator.emit("me", 5)
    a = await wait_notifications(receiver, 5, name="a")
    b = await wait_notifications(receiver, 5, name="b")
    # One notification, one webhook-id, whichever webhook it goes to.
    assert {r.headers["webhook-id"] for r in a} == {r.headers["webhook-id"] for r in b}


async def test_many_drives_start_as_a_paced_stream_not_a_stampede(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    resources = [f"drives/d{n:02d}" for n in range(20)]
    started = time.monotonic()
    await start_relay(
        drives=[drive(f"d{n:02d}", resource) for n, resource in enumerate(resources)],
        graph={"base_url": emulator.base_url, "connect_rate": 10, "connect_concurrency": 3},
    )
    # The gate paces the socket connects; the endpoint fetches before them are Graph requests,
    # paced by the tenant's budget (tests/test_tenant.py), which 20 drives do not reach.
    await wait_until(lambda: sum(emulator.connects.values()) >= 5, what="first five")
    assert time.monotonic() - started >= 0.35  # five starts at 10/s take 0.4 s, not 0
    await wait_until(
        lambda: all(emulator.connected(r) == 1 for r in resources), what="every drive connected"
    )
    assert time.monotonic() - started >= 1.9  # 20 starts at 10/s
    assert sum(emulator.endpoint_requests.values()) == 20  # nothing refused, nothing retried


def nested_notification(depth: int) -> str:
    """A notification event whose one item nests arrays `depth` deep."""
    return '{"value": [{"resource": "r", "deep": ' + "[" * depth + "]" * depth + "}]}"


async def test_a_notification_nested_100_000_deep_is_malformed_and_the_next_one_flows(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    await relay.connected()
    # 100,000 deep is past the parser's recursion limit; 600 deep parses, but is no notification.
    for depth in (100_000, 600):
        await emulator.emit("me", raw=nested_notification(depth))
    status = relay.watcher().status
    await wait_until(lambda: status.malformed == 2, what="both counted as malformed")
    await emulator.emit("me")
    assert seqs(await wait_notifications(receiver, 1)) == [1]
    assert len(receiver.delivered("hook")) == 1  # nothing else was posted
    assert (status.received, status.reconnects) == (1, 0)
    assert status.state is DriveState.CONNECTED and emulator.connected("me") == 1


async def test_a_plain_http_notification_url_off_loopback_is_warned_about_once(
    tmp_path: Path,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # push.example.test is not loopback by name; only this test's DNS points it at the emulator.
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo(
            "127.0.0.1" if host == "push.example.test" else host, *args, **kwargs
        )

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(watcher, "RENEW_FLOOR", 0.5)  # a 2 s lifetime renews every second
    async with GraphEmulator(tokens=[TOKEN], lifetime=2) as graph:
        graph.push_base_url = f"http://push.example.test:{graph.port}"
        with structlog.testing.capture_logs() as lines:
            relay = await start_relay(relay_config(tmp_path, graph, receiver))
            await wait_until(lambda: relay.watcher().status.renewals >= 2, what="two renewals")
            await graph.emit("me")
            assert seqs(await wait_notifications(receiver, 1)) == [1]
        secrets = graph.issued_secrets()
    warned = [line for line in lines if "not encrypted" in line["event"]]
    assert len(warned) == 1, warned  # once for the drive, not at each of its three endpoints
    assert warned[0]["endpoint"] == f"http://push.example.test:{graph.port}/notifications"
    assert warned[0]["log_level"] == "warning"
    assert len(secrets) == 3 and not any(secret in repr(lines) for secret in secrets)


async def test_a_drive_on_loopback_is_not_warned_about(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    with structlog.testing.capture_logs() as lines:
        relay = await start_relay()
        await relay.connected()
    assert [line for line in lines if "not encrypted" in line["event"]] == []


async def test_a_huge_announced_ping_interval_does_not_hide_a_silent_line(
    tmp_path: Path,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server announces a ping a day (and an hour to answer) but pings every 0.3 s. With the
    # caps at 1 s + 0.5 s, a line that goes silent is noticed after 1.5 s, not after 25 hours.
    monkeypatch.setattr(watcher, "MAX_PING_INTERVAL", 1.0)
    monkeypatch.setattr(watcher, "MAX_PING_TIMEOUT", 0.5)
    emulator = GraphEmulator(
        tokens=[TOKEN],
        ping_interval=0.3,
        ping_timeout=5,
        announced_ping_interval=86_400,
        announced_ping_timeout=3_600,
    )
    async with emulator as graph, FreezableProxy(graph.port) as proxy:
        graph.push_base_url = f"http://127.0.0.1:{proxy.port}"
        proxied = {"base_url": f"http://127.0.0.1:{proxy.port}/v1.0"}
        with structlog.testing.capture_logs() as lines:
            relay = await start_relay(relay_config(tmp_path, graph, receiver, graph=proxied))
            await relay.connected()
        capped = [line for line in lines if "beyond the caps" in line["event"]]
        assert capped and capped[0]["ping_interval"] == 86_400
        # While pings flow, the capped read timeout never fires: the first connection stays.
        await stays_true(
            lambda: relay.watcher().status.reconnects == 0, seconds=3, what="the first connection"
        )
        proxy.freeze()  # no close, no ping: just silence
        await wait_until(
            lambda: relay.watcher().status.reconnects == 1, timeout=6, what="silence noticed"
        )
        proxy.thaw()
        await wait_until(
            lambda: (
                relay.watcher().status.state is DriveState.CONNECTED and graph.connects["me"] >= 2
            ),
            what="reconnected",
        )
        await graph.emit("me")
        assert seqs(await wait_notifications(receiver, 1)) == [1]


async def test_copies_read_only_after_the_old_socket_began_closing_are_still_dropped(
    start_relay: StartRelay,
) -> None:
    """A switch-over where neither socket had read the notification both were sent before the
    old one started closing: both copies are read during the close. The second is a copy
    (it was delivered twice, under load, before the window opened at the close)."""
    relay = await start_relay()
    await relay.connected()
    watcher = relay.watcher()
    item = {"subscriptionId": "old", "resource": "r", "relaydEmulatorSeq": 1}
    copy = {**item, "subscriptionId": "new"}
    watcher._socket_opened()  # the new socket, beside the current one
    watcher._socket_closed()  # the old one starts closing; nothing was read meanwhile
    now = time.time()
    assert not watcher._is_copy(item, generation=1, now=now)
    assert watcher._is_copy(copy, generation=2, now=now)


@pytest.mark.timeout(60)
async def test_a_socket_answers_pings_and_relays_while_its_renewal_waits_for_graph(
    tmp_path: Path, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    """The renewal's endpoint fetch hangs (Graph behind a frozen proxy, the push service direct)
    for longer than the server waits for a pong. The socket that is up keeps answering pings and
    relaying: it stays the same connection, and the renewal completes once Graph answers."""
    # Pings every 0.5 s, 0.5 s to answer; a 10 s lifetime renews at 5 s, expires (quietly) at 10.
    emulator = GraphEmulator(
        tokens=[TOKEN], ping_interval=0.5, ping_timeout=0.5, lifetime=10, expiry="quiet"
    )
    async with emulator as graph, FreezableProxy(graph.port) as proxy:
        proxied = {"base_url": f"http://127.0.0.1:{proxy.port}/v1.0"}
        relay = await start_relay(relay_config(tmp_path, graph, receiver, graph=proxied))
        await relay.connected()
        proxy.freeze()  # from now on the endpoint fetch waits: the renewal is due at 5 s
        await stays_true(
            lambda: relay.watcher().status.reconnects == 0 and graph.connects["me"] == 1,
            seconds=7,  # 2 s and more past the renewal's start: four missed pongs' worth
            what="the first connection, through the stuck renewal",
        )
        await graph.emit("me")
        assert seqs(await wait_notifications(receiver, 1)) == [1]
        proxy.thaw()
        await wait_until(lambda: relay.watcher().status.renewals == 1, what="the renewal")
        await graph.emit("me")
        assert seqs(await wait_notifications(receiver, 2)) == [1, 2]
        assert relay.watcher().status.reconnects == 0


async def test_a_refused_websocket_upgrade_is_said_without_the_endpoints_credential(
    emulator: GraphEmulator, start_relay: StartRelay
) -> None:
    """The push service answers the WebSocket upgrade with 403. aiohttp's error names the URL,
    whose query is the endpoint's credential: what the drive shows and logs gives the status."""
    seen: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request.query_string)
        return web.Response(status=403)

    app = web.Application()
    app.router.add_get("/socket.io/", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        emulator.push_base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        with structlog.testing.capture_logs() as lines:
            relay = await start_relay()
            await wait_until(lambda: len(seen) >= 2, timeout=20, what="a refusal and a retry")
        status = relay.watcher().status
        assert status.state is DriveState.RECONNECTING
        assert status.last_error == "ConnectionLost: socket refused: HTTP 403"
    finally:
        await runner.cleanup()
    secrets = emulator.issued_secrets()
    assert secrets and any(secret in query for secret in secrets for query in seen)
    text = repr(lines) + repr(status)
    assert "socket refused: HTTP 403" in text
    assert not any(secret in text for secret in secrets)
