"""The relay end to end: emulator -> relay -> webhook receiver, over loopback sockets."""

from __future__ import annotations

import json

from conftest import StartRelay
from support.waiting import wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver


async def test_a_notification_reaches_the_webhook_with_the_documented_body(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    await wait_until(lambda: emulator.connected("me") == 1, what="relay connected")
    await emulator.emit("me")
    [request] = await receiver.wait_for(1)
    body = json.loads(request.body)
    assert body["type"] == "drive.notification"
    assert body["data"]["drive"] == "d1"
    assert body["data"]["resource"] == "me"
    assert body["data"]["notification"]["relaydEmulatorSeq"] == 1
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("relayd/")
    assert request.headers["webhook-id"].startswith("msg_")
    assert relay.watcher().status.received == 1
