"""Standard Webhooks signatures, checked by the reference verifier."""

import base64
import json
import time

import pytest
from standardwebhooks import Webhook

from relayd.signing import decode_secret, sign, signature_headers, verify

SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 24).decode()


def test_reference_library_verifies_our_signature() -> None:
    body = json.dumps({"type": "drive.notification", "data": {"x": "é"}}).encode()
    headers = signature_headers([decode_secret(SECRET_A)], "msg_1", int(time.time()), body)
    assert Webhook(SECRET_A).verify(body, headers) == {
        "type": "drive.notification",
        "data": {"x": "é"},
    }


def test_every_secret_signs_so_either_verifies_during_rotation() -> None:
    body = b'{"a":1}'
    keys = [decode_secret(SECRET_A), decode_secret(SECRET_B)]
    headers = signature_headers(keys, "msg_2", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(SECRET_A).verify(body, headers) == {"a": 1}
    assert Webhook(SECRET_B).verify(body, headers) == {"a": 1}


def test_signature_is_deterministic_for_id_timestamp_and_body() -> None:
    keys = [decode_secret(SECRET_A)]
    assert sign(keys, "m", 1, b"x") == sign(keys, "m", 1, b"x")
    assert sign(keys, "m", 1, b"x") != sign(keys, "m", 2, b"x")
    assert sign(keys, "m", 1, b"x").startswith("v1,")


def test_without_a_secret_only_id_and_timestamp() -> None:
    assert signature_headers([], "msg_3", 5, b"") == {
        "webhook-id": "msg_3",
        "webhook-timestamp": "5",
    }


def test_prefix_is_optional_and_garbage_is_refused() -> None:
    raw = base64.b64encode(b"k" * 32).decode()
    assert decode_secret(raw) == decode_secret("whsec_" + raw) == b"k" * 32
    with pytest.raises(ValueError, match="not base64"):
        decode_secret("whsec_!!!")
    with pytest.raises(ValueError, match="empty"):
        decode_secret("whsec_")


def test_verify_agrees_with_the_reference_verifier() -> None:
    body = b'{"type":"drive.notification"}'
    now = int(time.time())
    keys = [decode_secret(SECRET_A), decode_secret(SECRET_B)]
    headers = signature_headers(keys, "msg_4", now, body)
    Webhook(SECRET_B).verify(body, headers)  # the reference accepts what verify() accepts
    for key in keys:
        assert verify(key, headers, body, now=now) is None
    assert verify(decode_secret(SECRET_A), headers, body + b" ", now=now) == (
        "no signature matches the secret"
    )
    other = decode_secret("whsec_" + base64.b64encode(b"c" * 32).decode())
    assert verify(other, headers, body, now=now) == "no signature matches the secret"
    assert verify(keys[0], headers, body, now=now + 301) == (
        "webhook-timestamp is more than 300 s away from now"
    )
    assert verify(keys[0], {"webhook-id": "m"}, body, now=now) == (
        "webhook-id, webhook-timestamp or webhook-signature is missing"
    )
