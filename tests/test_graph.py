"""The pure half of relayd.graph: Graph's answers turned into values."""

import json
from datetime import UTC, datetime

import pytest

from relayd.graph import (
    MAX_EVENT_BYTES,
    MAX_EVENT_DEPTH,
    InvalidGraphResponse,
    MalformedNotification,
    parse_graph_error,
    parse_notification_event,
    parse_notification_url,
    parse_retry_after,
    parse_subscription,
    parse_timestamp,
    travels_unencrypted,
)


def test_current_url_form_keeps_query_and_takes_path_as_namespace() -> None:
    target = parse_notification_url(
        "https://southcentralus1-7.pushnp.svc.ms/notifications?token=a%2Bb%3D&applicationId=app"
    )
    assert target.namespace == "/notifications"
    assert target.server_url == (
        "https://southcentralus1-7.pushnp.svc.ms?token=a%2Bb%3D&applicationId=app"
    )
    assert "token" not in target.display
    assert "token" not in repr(target)


def test_older_callback_form_drops_callback_from_namespace() -> None:
    target = parse_notification_url("https://f3hb0mpua.example/zbaehwg/callback?snthgk=1ff4")
    assert target.namespace == "/zbaehwg"
    assert target.server_url == "https://f3hb0mpua.example?snthgk=1ff4"


@pytest.mark.parametrize("url", ["not a url", "ftp://x/notifications", "https://host", "/relative"])
def test_unusable_notification_urls_are_rejected(url: str) -> None:
    with pytest.raises(InvalidGraphResponse):
        parse_notification_url(url)


def test_real_subscription_answer() -> None:
    body = {
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
        "clientState": "system-managed:abc",
        "expirationDateTime": "2025-12-24T03:32:50.88Z",
        "id": "f267729a-0000",
        "notificationUrl": "https://h.pushnp.svc.ms/notifications?token=t&applicationId=a",
    }
    subscription = parse_subscription(body)
    assert subscription.id == "f267729a-0000"
    assert subscription.expires_at == datetime(2025, 12, 24, 3, 32, 50, 880000, tzinfo=UTC)
    assert subscription.target.namespace == "/notifications"


def test_subscription_without_expiry_is_fine_without_url_is_not() -> None:
    assert parse_subscription({"notificationUrl": "https://h/n?x=1"}).expires_at is None
    with pytest.raises(InvalidGraphResponse, match="notificationUrl"):
        parse_subscription({"id": "x"})
    with pytest.raises(InvalidGraphResponse, match="not a JSON object"):
        parse_subscription(["x"])
    with pytest.raises(InvalidGraphResponse, match="expirationDateTime"):
        parse_subscription({"notificationUrl": "https://h/n", "expirationDateTime": "soon"})


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("2026-05-11T21:52:27.52Z", 520000),
        ("2026-05-11T21:52:27.5212345Z", 521234),
        ("2026-05-11T21:52:27Z", 0),
        ("2026-05-11T23:52:27.1+02:00", 100000),
    ],
)
def test_graph_timestamps_of_any_precision(text: str, micro: int) -> None:
    parsed = parse_timestamp(text)
    assert (parsed.hour, parsed.microsecond, parsed.tzinfo) == (21, micro, UTC)


def test_graph_error_body_is_read() -> None:
    body = json.dumps({"error": {"code": "notSupported", "message": "nope"}}).encode()
    error = parse_graph_error(400, body, {})
    assert error.not_supported and not error.throttled
    assert "400 notSupported" in str(error)
    throttled = parse_graph_error(429, b"{}", {"Retry-After": "7"})
    assert throttled.throttled and throttled.retry_after == 7.0
    proxy = parse_graph_error(502, b"<html>bad gateway</html>", {})
    assert proxy.code == "unknown" and "bad gateway" in proxy.message


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_notification_event_is_a_json_string_with_items_kept_whole() -> None:
    item = {"subscriptionId": "s", "resource": "r", "somethingNew": {"nested": [1, 2]}}
    assert parse_notification_event(json.dumps({"value": [item]})) == [item]
    assert parse_notification_event(json.dumps({"value": []})) == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{not json", "not JSON"),
        ({"value": []}, "type dict, expected a JSON string"),
        (42, "type int"),
        (None, "NoneType"),
        ('{"other": 1}', "no 'value'"),
        ('["value"]', "no 'value'"),
        ('{"value": {}}', "not a list"),
        ('{"value": [1]}', "not an object"),
        ("x" * (MAX_EVENT_BYTES + 1), "characters, over"),
    ],
)
def test_malformed_events_say_what_is_wrong(payload: object, reason: str) -> None:
    with pytest.raises(MalformedNotification, match=reason):
        parse_notification_event(payload)


def nested(depth: int) -> str:
    """A notification whose one item holds arrays `depth` deep in an unknown field."""
    return '{"value": [{"resource": "r", "deep": ' + "[" * depth + "]" * depth + "}]}"


@pytest.mark.parametrize("depth", [MAX_EVENT_DEPTH, 500, 100_000])
def test_a_notification_nested_too_deeply_is_malformed_not_a_recursion_error(depth: int) -> None:
    # 100,000 deep: past the parser's recursion limit (RecursionError). 500: the parser copes, but
    # what comes after it (json.dumps into a webhook body, deeper in the stack) need not.
    payload = nested(depth)
    with pytest.raises(MalformedNotification, match="nested too deeply") as raised:
        parse_notification_event(payload)
    assert "[[" not in str(raised.value)  # the payload is not echoed


def test_a_notification_within_the_depth_limit_parses_and_encodes() -> None:
    # Three levels are the envelope ({"value": [{...}]}); the rest is the item's own nesting.
    [item] = parse_notification_event(nested(MAX_EVENT_DEPTH - 3))
    assert json.loads(json.dumps(item)) == item


@pytest.mark.parametrize(
    ("url", "unencrypted"),
    [
        ("https://southcentralus1-7.pushnp.svc.ms/notifications", False),
        ("wss://push.example.com/notifications", False),
        ("http://push.example.com/notifications", True),
        ("ws://push.example.com/notifications", True),
        ("HTTP://Push.Example.COM:8080/zbaehwg", True),
        ("http://10.0.0.7/notifications", True),  # private is not loopback: it crosses a network
        ("http://[2001:db8::1]/notifications", True),
        ("http://127.0.0.1:8080/notifications", False),
        ("http://127.8.9.10/notifications", False),
        ("ws://[::1]:9000/notifications", False),
        ("http://[::ffff:127.0.0.1]/notifications", False),
        ("http://localhost/notifications", False),
        ("http://LOCALHOST./notifications", False),
        ("http://emulator.localhost/notifications", False),
        ("http://localhost.example.com/notifications", True),
        ("http://127.0.0.1.nip.io/notifications", True),
    ],
)
def test_plain_http_off_loopback_is_unencrypted(url: str, unencrypted: bool) -> None:
    assert travels_unencrypted(url) is unencrypted
