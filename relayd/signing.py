"""Standard Webhooks signatures (https://www.standardwebhooks.com/), pure functions.

A delivery attempt carries `webhook-id`, `webhook-timestamp` and `webhook-signature`, the last
being `v1,` + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")). Every configured secret
signs and the signatures are space-separated, so a receiver can rotate secrets without a gap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_...` secret (the prefix is optional, as in the reference
    library)."""
    text = secret.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("secret is not base64 after its whsec_ prefix") from None
    if not key:
        raise ValueError("secret is empty")
    return key


def sign(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def signature_headers(
    keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt; unsigned when there is no key."""
    headers = {"webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if keys:
        headers["webhook-signature"] = sign(keys, message_id, timestamp, body)
    return headers


TIMESTAMP_TOLERANCE = 300  # seconds; the Standard Webhooks reference verifier uses five minutes


def verify(
    key: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance: int = TIMESTAMP_TOLERANCE,
) -> str | None:
    """Check one attempt as a receiver would; None when it is genuine, else what is wrong.

    `headers` must look names up case-insensitively (aiohttp's and requests' do). Any one of the
    space-separated `v1,` signatures may match: senders sign with every secret while rotating.
    """
    message_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not message_id or not timestamp or not signatures:
        return "webhook-id, webhook-timestamp or webhook-signature is missing"
    if not timestamp.isdigit():
        return "webhook-timestamp is not a number of seconds"
    if abs(now - int(timestamp)) > tolerance:
        return f"webhook-timestamp is more than {tolerance} s away from now"
    expected = sign([key], message_id, int(timestamp), body).encode()
    for signature in signatures.split(" "):
        if hmac.compare_digest(signature.encode(), expected):
            return None
    return "no signature matches the secret"
