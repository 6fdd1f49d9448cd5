"""The bodies relayd POSTs: built once at receipt, whatever Graph's JSON holds."""

from __future__ import annotations

import json

from conftest import StartRelay, wait_notifications

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.events import NOTIFICATION, encode


def test_a_lone_surrogate_is_sent_escaped_not_dropped() -> None:
    body = encode(NOTIFICATION, 0.0, {"notification": {"name": "half \ud800 a pair"}})
    assert json.loads(body)["data"]["notification"]["name"] == "half \ud800 a pair"
    assert b"\\ud800" in body


def test_text_is_sent_as_utf8_unescaped() -> None:
    body = encode(NOTIFICATION, 0.0, {"notification": {"name": "Rapport été"}})
    assert "Rapport été".encode() in body


async def test_a_notification_holding_a_lone_surrogate_is_delivered(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    await relay.connected()
    # JSON may hold "\ud800" (an escape of half a UTF-16 pair); UTF-8 cannot.
    await emulator.emit("me", raw=json.dumps({"value": [{"resource": "x\ud800"}]}))
    [delivered] = await wait_notifications(receiver, 1)
    assert delivered.json()["data"]["notification"] == {"resource": "x\ud800"}
