"""WebhookReceiver records what arrives and answers as scripted."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from support.waiting import wait_until

from relayd.emulator import ReceivedRequest, ScriptedResponse, WebhookReceiver


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes = b"{}"
) -> aiohttp.ClientResponse:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp


async def test_records_requests_with_headers_and_body(
    http: aiohttp.ClientSession, receiver: WebhookReceiver
) -> None:
    assert receiver.url() == f"http://127.0.0.1:{receiver.port}/hook"
    async with http.post(receiver.url(), data=b'{"n": 1}', headers={"Webhook-Id": "msg_1"}) as resp:
        assert resp.status == 200
    (got,) = receiver.received
    assert got.path == "/hook"
    assert got.name == "hook"
    assert got.method == "POST"
    assert got.json() == {"n": 1}
    assert got.headers["webhook-id"] == "msg_1"  # case-insensitive
    assert got.status == 200
    assert receiver.delivered("hook") == [got]
    assert receiver.delivered("other") == []


async def test_scripted_answers_then_the_default(
    http: aiohttp.ClientSession, receiver: WebhookReceiver
) -> None:
    receiver.script(
        "hook",
        [
            ScriptedResponse(503),
            ScriptedResponse(429, headers={"Retry-After": "1"}),
            ScriptedResponse(410, body="gone"),
        ],
    )
    statuses = []
    for _ in range(4):
        async with http.post(receiver.url(), data=b"{}") as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert resp.headers["Retry-After"] == "1"
            if resp.status == 410:
                assert await resp.text() == "gone"
    assert statuses == [503, 429, 410, 200]
    assert [r.status for r in receiver.requests] == statuses
    assert len(receiver.received) == 1  # only the 2xx counts as delivered


async def test_scripts_and_defaults_are_per_path(
    http: aiohttp.ClientSession, receiver: WebhookReceiver
) -> None:
    receiver.set_default("down", ScriptedResponse(503))
    for _ in range(3):
        assert (await post(http, receiver.url("down"))).status == 503
    assert (await post(http, receiver.url("up"))).status == 200
    receiver.set_default("down", ScriptedResponse(204))
    assert (await post(http, receiver.url("down"))).status == 204
    assert len(receiver.delivered("down")) == 1
    assert len(receiver.delivered("up")) == 1


async def test_a_slow_answer_does_not_hold_up_others(
    http: aiohttp.ClientSession, receiver: WebhookReceiver
) -> None:
    receiver.script("slow", [ScriptedResponse(delay=0.5)])
    started = time.monotonic()
    slow = asyncio.create_task(post(http, receiver.url("slow")))
    try:
        await wait_until(lambda: len(receiver.requests) == 1)  # the slow one is being answered
        fast = await post(http, receiver.url("fast"))
        assert fast.status == 200
        assert not slow.done()  # answered while the slow one still waits
        assert (await slow).status == 200
        assert time.monotonic() - started >= 0.5
    finally:
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
    # The slow one arrived first but was delivered once its answer went out.
    assert [r.name for r in receiver.requests] == ["slow", "fast"]
    assert [r.name for r in receiver.received] == ["fast", "slow"]


async def test_wait_for_returns_once_enough_arrived(
    http: aiohttp.ClientSession, receiver: WebhookReceiver
) -> None:
    async def send_later() -> None:
        for n in range(3):
            await post(http, receiver.url(), f'{{"n": {n}}}'.encode())

    sender = asyncio.create_task(send_later())
    got = await receiver.wait_for(3, timeout=5)
    await sender
    assert [r.json()["n"] for r in got] == [0, 1, 2]


async def test_wait_for_times_out_saying_how_many_arrived(
    http: aiohttp.ClientSession, receiver: WebhookReceiver
) -> None:
    receiver.script("hook", [ScriptedResponse(500)])
    await post(http, receiver.url())
    await post(http, receiver.url())
    with pytest.raises(TimeoutError, match=r"1 of 3 deliveries to /hook .* \(2 requests"):
        await receiver.wait_for(3, timeout=0.2)


async def test_on_request_sees_every_request(http: aiohttp.ClientSession) -> None:
    seen: list[ReceivedRequest] = []
    async with WebhookReceiver(on_request=seen.append) as rx:
        rx.script("hook", [ScriptedResponse(500)])
        await post(http, rx.url())
        await post(http, rx.url())
    assert [r.status for r in seen] == [500, 200]


async def test_a_failing_callback_does_not_fail_the_delivery(http: aiohttp.ClientSession) -> None:
    def explode(_: ReceivedRequest) -> None:
        raise RuntimeError("printer on fire")

    async with WebhookReceiver(on_request=explode) as rx:
        assert (await post(http, rx.url())).status == 200
        assert len(rx.received) == 1


async def test_restart_keeps_port_and_records(http: aiohttp.ClientSession) -> None:
    rx = WebhookReceiver()
    await rx.start()
    try:
        port = rx.port
        await post(http, rx.url())
        await rx.stop()
        await rx.stop()  # idempotent
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, rx.url())
        await rx.start()
        assert rx.port == port
        await post(http, rx.url())
        assert len(rx.received) == 2
    finally:
        await rx.stop()


async def test_stop_cuts_a_delayed_answer_short(http: aiohttp.ClientSession) -> None:
    arrived = asyncio.Event()
    rx = WebhookReceiver(on_request=lambda _: arrived.set())
    await rx.start()
    rx.script("hook", [ScriptedResponse(delay=30)])
    pending = asyncio.create_task(post(http, rx.url()))
    try:
        await asyncio.wait_for(arrived.wait(), 5)
        started = time.monotonic()
        await rx.stop()
        assert time.monotonic() - started < 2
        assert (await pending).status == 503
        assert rx.received == []
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await rx.stop()
