"""JSON per notification: the standard library against orjson, for the passes relayd makes.

    python benchmarks/json_per_notification.py [--repeat 7] [--number 20000] [--json]

A notification crosses JSON three times in relayd: python-socketio decodes the Socket.IO packet
(`42/ns,["notification","<string>"]`, through python-engineio's `json.loads` with its `parse_int`
guard), `relayd.graph.parse_notification_event` parses the string argument (`{"value": [item]}`)
and checks its depth, and `relayd.events.encode` builds the webhook body. Each is timed here on
the emulator's payload shape, as relayd runs it today and with orjson in place of `json`
(written out in this file: relayd itself is not changed). Needs `orjson` importable; it is not a
relayd dependency (an experiment for issue 14).

Printed: ns per call, the best of `--repeat` timings of `--number` calls (and the median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

from socketio import packet as sio_packet

try:
    import orjson
except ImportError:  # not a relayd dependency: this benchmark is an experiment for issue 14
    sys.exit("json_per_notification.py needs orjson: pip install orjson")

from relayd import events, graph

RESOURCE = "drives/d0001"
NAMESPACE = "/notifications?token=abc"


def graph_payload(seq: int = 1) -> str:
    """The argument of a `notification` event, as the emulator (and Graph) sends it."""
    item = {
        "subscriptionId": "5e1b6d2c-8a4f-4d3e-9b6a-1f0e2d3c4b5a",
        "clientState": "cs_0123456789abcdef0123456789abcdef",
        "expirationDateTime": "2026-12-04T12:00:00.000000Z",
        "resource": "b!AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIjKlMnOpQrStUvWxYz01",
        "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "siteUrl": "/personal/emulator",
        "webId": "9b3c1f2e-4d5a-6b7c-8d9e-0f1a2b3c4d5e",
        "relaydEmulatorSeq": seq,
    }
    return json.dumps({"value": [item]})


def socketio_packet(payload: str) -> str:
    """The Engine.IO message's text: Socket.IO EVENT on the notificationUrl's namespace."""
    return "2" + NAMESPACE + "," + json.dumps(["notification", payload], separators=(",", ":"))


def parse_orjson(payload: object) -> list[dict[str, Any]]:
    """parse_notification_event with orjson.loads in place of json.loads, same checks."""
    if isinstance(payload, bytes | bytearray):
        payload = bytes(payload).decode("utf-8", "replace")
    if not isinstance(payload, str):
        raise graph.MalformedNotification("not a string")
    if len(payload) > graph.MAX_EVENT_BYTES:
        raise graph.MalformedNotification("too long")
    try:
        document = orjson.loads(payload)
        too_deep = graph._nests_deeper_than(document, graph.MAX_EVENT_DEPTH)
    except orjson.JSONDecodeError as exc:
        raise graph.MalformedNotification(f"argument is not JSON ({exc.msg})") from None
    if too_deep:
        raise graph.MalformedNotification("too deep")
    if not isinstance(document, dict) or "value" not in document:
        raise graph.MalformedNotification("JSON has no 'value' member")
    items = document["value"]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise graph.MalformedNotification("'value' is not a list of objects")
    return items


def encode_orjson(event_type: str, timestamp: float, data: Any) -> bytes:
    """relayd.events.encode with orjson.dumps (compact, UTF-8, like ensure_ascii=False)."""
    body = {"type": event_type, "timestamp": events.rfc3339(timestamp), "data": data}
    return orjson.dumps(body)


class OrjsonForSocketio:
    """What python-socketio's `Packet.json` would be with orjson (its `json` hook)."""

    @staticmethod
    def dumps(obj: Any, **_kw: Any) -> str:
        return orjson.dumps(obj).decode()

    @staticmethod
    def loads(text: str | bytes) -> Any:
        return orjson.loads(text)


def decode_packet_orjson(encoded: str) -> Any:
    pkt = sio_packet.Packet.__new__(sio_packet.Packet)
    pkt.json = OrjsonForSocketio  # type: ignore[assignment]
    pkt.packet_type = sio_packet.EVENT
    pkt.data = None
    pkt.namespace = None
    pkt.id = None
    pkt.attachment_count = 0
    pkt.attachments = []
    pkt.decode(encoded)
    return pkt.data


def decode_packet_stock(encoded: str) -> Any:
    return sio_packet.Packet(encoded_packet=encoded).data


def time_ns(call: Callable[[], object], repeat: int, number: int) -> tuple[float, float]:
    runs = timeit.repeat(call, repeat=repeat, number=number, timer=time.perf_counter)
    per = [r / number * 1e9 for r in runs]
    return min(per), statistics.median(per)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)

    payload = graph_payload()
    encoded = socketio_packet(payload)
    items = graph.parse_notification_event(payload)
    data = {"drive": "d0001", "resource": RESOURCE, "notification": items[0]}
    now = time.time()
    # Same results either way, or the comparison means nothing.
    expected = ["notification", payload]
    assert decode_packet_orjson(encoded) == decode_packet_stock(encoded) == expected
    assert parse_orjson(payload) == items
    assert json.loads(encode_orjson(events.NOTIFICATION, now, data)) == json.loads(
        events.encode(events.NOTIFICATION, now, data)
    )

    document = graph.parse_notification_event(payload)
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            "socket.io packet decode",
            lambda: decode_packet_stock(encoded),
            lambda: decode_packet_orjson(encoded),
        ),
        (
            "parse_notification_event",
            lambda: graph.parse_notification_event(payload),
            lambda: parse_orjson(payload),
        ),
        ("  of which loads alone", lambda: json.loads(payload), lambda: orjson.loads(payload)),
        (
            "  of which depth check",
            lambda: graph._nests_deeper_than(document, graph.MAX_EVENT_DEPTH),
            lambda: graph._nests_deeper_than(document, graph.MAX_EVENT_DEPTH),
        ),
        (
            "events.encode (body)",
            lambda: events.encode(events.NOTIFICATION, now, data),
            lambda: encode_orjson(events.NOTIFICATION, now, data),
        ),
        ("  of which rfc3339", lambda: events.rfc3339(now), lambda: events.rfc3339(now)),
    ]
    rows = []
    for name, stock, fast in cases:
        s_min, s_med = time_ns(stock, args.repeat, args.number)
        o_min, o_med = time_ns(fast, args.repeat, args.number)
        rows.append(
            {"pass": name, "json_ns": s_min, "json_median_ns": s_med}
            | {"orjson_ns": o_min, "orjson_median_ns": o_med}
        )
    top = [r for r in rows if not r["pass"].startswith(" ")]
    total = {
        "pass": "total (3 passes)",
        "json_ns": sum(r["json_ns"] for r in top),
        "json_median_ns": sum(r["json_median_ns"] for r in top),
        "orjson_ns": sum(r["orjson_ns"] for r in top),
        "orjson_median_ns": sum(r["orjson_median_ns"] for r in top),
    }
    rows.append(total)
    meta = {
        "python": sys.version.split()[0],
        "orjson": orjson.__version__,
        "payload_chars": len(payload),
        "body_bytes": len(events.encode(events.NOTIFICATION, now, data)),
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(
        f"Python {meta['python']}, orjson {meta['orjson']}; payload {meta['payload_chars']} chars,"
        f" body {meta['body_bytes']} bytes; ns per call, best of {args.repeat} (median)"
    )
    print(f"{'pass':<28}  {'json ns':>16}  {'orjson ns':>16}  {'saved ns':>9}")
    for r in rows:
        j = f"{r['json_ns']:,.0f} ({r['json_median_ns']:,.0f})"
        o = f"{r['orjson_ns']:,.0f} ({r['orjson_median_ns']:,.0f})"
        print(f"{r['pass']:<28}  {j:>16}  {o:>16}  {r['json_ns'] - r['orjson_ns']:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
