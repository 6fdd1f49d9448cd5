"""The bodies relayd POSTs to webhooks, built once at receipt and stored as bytes; pure functions.

Every body has the Standard Webhooks shape `{"type", "timestamp", "data"}`. The bytes are fixed at
receipt: retries send them unchanged, so a receiver's signature check and dedupe on `webhook-id`
always see the same thing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from relayd.outbox import NewDelivery

NOTIFICATION = "drive.notification"


def message_id() -> str:
    """A fresh `webhook-id`, in the `msg_` style of the Standard Webhooks examples."""
    return f"msg_{uuid.uuid4().hex}"


def rfc3339(timestamp: float) -> str:
    """`2026-11-26T21:42:52.123456Z`: RFC 3339, UTC, microseconds."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode(event_type: str, timestamp: float, data: Mapping[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": rfc3339(timestamp), "data": data}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def notification_deliveries(
    drive: str,
    resource: str,
    webhooks: Sequence[str],
    items: Sequence[Mapping[str, Any]],
    received: float,
) -> list[NewDelivery]:
    """One delivery per (notification item, webhook); an item keeps one id across webhooks."""
    deliveries: list[NewDelivery] = []
    for item in items:
        data = {"drive": drive, "resource": resource, "notification": item}
        body = encode(NOTIFICATION, received, data)
        msg = message_id()
        deliveries.extend(
            NewDelivery(message_id=msg, webhook=webhook, drive=drive, body=body, created=received)
            for webhook in webhooks
        )
    return deliveries
