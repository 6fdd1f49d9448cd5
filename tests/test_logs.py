"""Credentials never reach a log line, even when a library puts them in a message."""

import io
import json
import logging

import structlog

from relayd import logs


def test_redact_masks_query_credentials_bearer_jwt_and_secrets() -> None:
    text = (
        "GET https://h.svc.ms/notifications?token=SECRETQ&applicationId=app "
        "Authorization: Bearer abc.def-ghi eyJhbGciOi.eyJzdWIiOiJ4In0.c2lnbmF0dXJl "
        "whsec_c2VjcmV0c2VjcmV0 /zbaehwg/callback?snthgk=OLDSECRET"
    )
    masked = logs.redact(text)
    for secret in ("SECRETQ", "abc.def-ghi", "eyJhbGciOi", "c2VjcmV0c2VjcmV0", "OLDSECRET"):
        assert secret not in masked
    assert "applicationId=app" in masked


def test_structlog_and_stdlib_lines_are_redacted_json() -> None:
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        structlog.get_logger("t").info("connecting", url="wss://h/?token=LEAK1", drive="d1")
        logging.getLogger("aiohttp.client").warning("failed for Bearer LEAK2")
    finally:
        logs.configure("info", "json")
    output = stream.getvalue()
    assert "LEAK1" not in output and "LEAK2" not in output
    first = json.loads(output.splitlines()[0])
    assert first["drive"] == "d1" and first["event"] == "connecting" and first["level"] == "info"
