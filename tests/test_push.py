"""The push service's protocol, as relayd.push reads it: pure, no loop, no socket.

The socket side (pongs, order, back-pressure, silence, renewal) is proven against the Graph
emulator and the reference JavaScript server in test_watcher.py and tests/interop.
"""

from __future__ import annotations

import pytest

from relayd.push import (
    PING,
    PingTimes,
    ProtocolError,
    engineio_url,
    join_packet,
    leave_packet,
    ping_times,
    read_frame,
)

NS = "/notifications"


@pytest.mark.parametrize(
    ("server_url", "expected"),
    [
        (
            "https://push.example/?token=a%2Bb&applicationId=x",
            "wss://push.example/socket.io/?token=a%2Bb&applicationId=x&transport=websocket&EIO=4",
        ),
        (
            "http://127.0.0.1:8080?snthgk=q",
            "ws://127.0.0.1:8080/socket.io/?snthgk=q&transport=websocket&EIO=4",
        ),
        ("wss://h", "wss://h/socket.io/?transport=websocket&EIO=4"),
    ],
)
def test_the_credential_in_the_query_passes_through_unchanged(
    server_url: str, expected: str
) -> None:
    assert engineio_url(server_url) == expected


def test_ping_times_come_from_the_open_packet_in_seconds() -> None:
    opening = '0{"sid":"s","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1}'
    assert ping_times(opening) == PingTimes(25.0, 20.0)
    assert ping_times(opening).silence == 45.0


@pytest.mark.parametrize(
    "opening", ['0{"sid":"s"}', "0not json", '4{"pingInterval":1,"pingTimeout":1}', ""]
)
def test_an_open_packet_without_ping_times_is_a_protocol_error(opening: str) -> None:
    with pytest.raises(ProtocolError):
        ping_times(opening)


def test_join_and_leave_name_the_namespace() -> None:
    assert join_packet(NS) == "40/notifications,"
    assert leave_packet(NS) == "41/notifications,"
    assert join_packet("/") == "40"


def test_frames_of_the_namespace_are_read_and_others_ignored() -> None:
    event = read_frame('42/notifications,["notification","{\\"value\\":[]}"]', NS)
    assert (event.kind, event.args) == ("event", ("notification", '{"value":[]}'))
    assert read_frame("2", NS) is PING
    assert read_frame('40/notifications,{"sid":"n1"}', NS).kind == "joined"
    assert read_frame("41/notifications,", NS).kind == "left"
    assert read_frame("1", NS).kind == "close"
    assert read_frame("6", NS).kind == "ignore"
    assert read_frame('42/other,["notification","x"]', NS).kind == "ignore"
    assert read_frame('43/notifications,1["ack"]', NS).kind == "ignore"


def test_a_refusal_carries_the_servers_message() -> None:
    refused = read_frame('44/notifications,{"message":"invalid token"}', NS)
    assert (refused.kind, refused.args) == ("refused", ("invalid token",))


def test_broken_frames_are_told_apart_without_echoing_them() -> None:
    malformed = read_frame('42/notifications,["notification", secret not json', NS)
    assert malformed.kind == "malformed" and "secret" not in malformed.args[0]
    assert read_frame("42/notifications,{}", NS).kind == "malformed"  # an event has a name
    unexpected = read_frame("5", NS)
    assert (unexpected.kind, unexpected.args) == ("unexpected", ("Engine.IO packet type '5'",))
