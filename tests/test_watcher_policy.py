"""Renewal timing, reconnect backoff and switch-over dedupe: relayd.watcher's pure half."""

from datetime import UTC, datetime, timedelta

import pytest

from relayd.events import notification_deliveries
from relayd.graph import BACKOFF_MAX, backoff_delay
from relayd.watcher import (
    RENEW_FLOOR,
    RENEW_WITHOUT_EXPIRY,
    Inbox,
    dedupe_key,
    renewal_delay,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_long_lifetime_renews_two_minutes_early() -> None:
    assert renewal_delay(NOW + timedelta(hours=1), NOW) == pytest.approx(3600 - 120)


def test_short_lifetime_renews_at_half_life_not_in_a_loop() -> None:
    assert renewal_delay(NOW + timedelta(seconds=20), NOW) == pytest.approx(10)
    assert renewal_delay(NOW + timedelta(seconds=200), NOW) == pytest.approx(100)


def test_renewal_never_more_often_than_the_floor() -> None:
    assert renewal_delay(NOW + timedelta(seconds=2), NOW) == RENEW_FLOOR
    assert renewal_delay(NOW - timedelta(seconds=30), NOW) == RENEW_FLOOR


def test_no_expiry_means_every_thirty_minutes() -> None:
    assert renewal_delay(None, NOW) == RENEW_WITHOUT_EXPIRY == 1800


def test_backoff_doubles_with_jitter_and_caps() -> None:
    assert [backoff_delay(n, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [0.5, 1, 2, 4]
    assert [backoff_delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_delay(50, rand=lambda: 1.0) == BACKOFF_MAX
    assert backoff_delay(50, rand=lambda: 0.0) == BACKOFF_MAX / 2


def test_copies_from_two_subscriptions_share_a_dedupe_key() -> None:
    a = {"subscriptionId": "1", "clientState": "x", "expirationDateTime": "t1", "resource": "r"}
    b = {"subscriptionId": "2", "clientState": "y", "expirationDateTime": "t2", "resource": "r"}
    c = {**a, "resource": "other"}
    assert dedupe_key(a) == dedupe_key(b) != dedupe_key(c)


async def test_the_inbox_counts_notifications_once_whatever_their_webhooks() -> None:
    """What /status, the unstored metric and the lost count at a stop say: notifications, each
    once, however many webhooks it fans out to."""
    inbox = Inbox(limit=10)
    fan_out = notification_deliveries("d1", "me", ["a", "b"], [{"n": 1}, {"n": 2}], 0.0)
    await inbox.put(fan_out)  # two notifications, four deliveries
    assert len(inbox) == 2
    assert len(await inbox.take()) == 4
    inbox.stored()
    assert len(inbox) == 0
    await inbox.put(fan_out[:2])  # one notification, both of its webhooks
    assert inbox.close() == 1
