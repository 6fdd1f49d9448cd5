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

from relayd.store import NewDelivery

NOTIFICATION = "drive.notification"
CHANGES = "drive.changes"
RESYNC = "drive.resync"


def message_id() -> str:
    """A fresh `webhook-id`, in the `msg_` style of the Standard Webhooks examples."""
    return f"msg_{uuid.uuid4().hex}"


def rfc3339(timestamp: float) -> str:
    """`2026-11-26T21:42:52.123456Z`: RFC 3339, UTC, microseconds."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode(event_type: str, timestamp: float, data: Mapping[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": rfc3339(timestamp), "data": data}
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800", which JSON allows and UTF-8 cannot hold): sent escaped,
        # exactly as Graph wrote it, rather than dropped with the notification around it.
        return json.dumps(body, separators=(",", ":")).encode()


def _fan_out(
    drive: str, webhooks: Sequence[str], event_type: str, data: Mapping[str, Any], at: float
) -> list[NewDelivery]:
    """One event, one body, one `webhook-id`, a delivery per webhook."""
    body = encode(event_type, at, data)
    msg = message_id()
    return [
        NewDelivery(message_id=msg, webhook=webhook, drive=drive, body=body, created=at)
        for webhook in webhooks
    ]


def notification_deliveries(
    drive: str,
    resource: str,
    webhooks: Sequence[str],
    items: Sequence[Mapping[str, Any]],
    received: float,
) -> list[NewDelivery]:
    """`drive.notification`: one event per notification item."""
    return [
        delivery
        for item in items
        for delivery in _fan_out(
            drive,
            webhooks,
            NOTIFICATION,
            {"drive": drive, "resource": resource, "notification": item},
            received,
        )
    ]


def changes_deliveries(
    drive: str,
    resource: str,
    webhooks: Sequence[str],
    items: Sequence[Mapping[str, Any]],
    received: float,
    *,
    max_items: int,
) -> list[NewDelivery]:
    """`drive.changes`: bodies of at most `max_items` driveItems each."""
    return [
        delivery
        for start in range(0, len(items), max_items)
        for delivery in _fan_out(
            drive,
            webhooks,
            CHANGES,
            {"drive": drive, "resource": resource, "items": list(items[start : start + max_items])},
            received,
        )
    ]


def resync_deliveries(
    drive: str, resource: str, webhooks: Sequence[str], reason: str, now: float
) -> list[NewDelivery]:
    """`drive.resync`: changes may have been missed; the receiver should look for itself."""
    data = {"drive": drive, "resource": resource, "reason": reason}
    return _fan_out(drive, webhooks, RESYNC, data, now)
