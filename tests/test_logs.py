"""Credentials never reach a log line, even when a library puts them in a message; every record,
whichever library logged it, is one line of the configured format."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import engineio
import pytest
import socketio
import structlog
import yaml
from aiohttp import web
from support.daemon import Daemon, free_port, running_daemon, write_daemon_config
from support.waiting import eventually, wait_until
from test_cli import RelayProcess, write_config

import relayd
from relayd import logs
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ScriptedResponse


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


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging configured to a buffer for the test, back to stderr after it."""
    buffer = io.StringIO()
    yield buffer
    logs.configure("debug", "console")


def test_structlog_and_stdlib_lines_are_redacted_json(stream: io.StringIO) -> None:
    logs.configure("info", "json", stream=stream)
    structlog.get_logger("t").info("connecting", url="wss://h/?token=LEAK1", drive="d1")
    logging.getLogger("aiohttp.client").warning("failed for Bearer LEAK2")
    structlog.get_logger("t").error("refused", errors=["line 1: ?token=LEAK3"])
    output = stream.getvalue()
    assert "LEAK1" not in output and "LEAK2" not in output and "LEAK3" not in output
    first = json.loads(output.splitlines()[0])
    assert first["drive"] == "d1" and first["event"] == "connecting" and first["level"] == "info"


def failing_record(logger: logging.Logger) -> None:
    """What python-engineio does when a handler raises: an error with a traceback."""
    try:
        raise ValueError("bad packet from wss://h/socket.io/?token=LEAK4\nsecond line")
    except ValueError:
        logger.exception("message async handler error")


def test_a_library_traceback_is_one_json_object_per_line(stream: io.StringIO) -> None:
    logs.configure("info", "json", stream=stream)
    failing_record(logging.getLogger("engineio.client"))
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "message async handler error"
    assert (record["logger"], record["level"]) == ("engineio.client", "error")
    assert record["timestamp"].endswith("Z")
    assert "Traceback" in record["exception"] and "second line" in record["exception"]
    assert "LEAK4" not in line


def test_console_lines_escape_line_breaks_and_a_reload_reaches_library_loggers(
    stream: io.StringIO,
) -> None:
    logs.configure("info", "json", stream=stream)
    failing_record(logging.getLogger("engineio.client"))
    # A reload that changes the format: the same library logger now writes console lines.
    logs.configure("info", "console", stream=stream)
    failing_record(logging.getLogger("engineio.client"))
    logging.getLogger("asyncio").error("one\r\ntwo\u2028three")
    first, second, third = stream.getvalue().splitlines()
    assert json.loads(first)["logger"] == "engineio.client"
    assert second.startswith("20") and "[error" in second and "logger=engineio.client" in second
    assert "Traceback" in second and "\\n" in second and "LEAK4" not in second
    assert third.endswith("one\\r\\ntwo\\u2028three logger=asyncio")


def test_a_record_that_cannot_be_formatted_is_still_one_line(stream: io.StringIO) -> None:
    logs.configure("info", "json", stream=stream)
    logging.getLogger("somelib").error("%s and %s", "only one")
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["event"].startswith("unformattable log record")


def test_python_engineio_and_socketio_add_no_handler_of_their_own(stream: io.StringIO) -> None:
    # As in a fresh process: their default loggers untouched, nothing attached yet.
    for name in ("engineio.client", "engineio.server", "socketio.client", "socketio.server"):
        logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger(name).handlers.clear()
    stray = logging.StreamHandler(io.StringIO())
    logging.getLogger("somelib").addHandler(stray)  # any library's own, attached before
    logs.configure("info", "json", stream=stream)
    # Building a client or a server is when they attach a StreamHandler to a NOTSET logger.
    socketio.AsyncClient(reconnection=False, handle_sigint=False)
    engineio.AsyncClient(handle_sigint=False)
    socketio.AsyncServer(async_mode="aiohttp")
    attached = {
        name: logger.handlers
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and logger.handlers
    }
    assert attached == {}
    for name in ("engineio.client", "socketio.client", "engineio.server", "somelib"):
        logging.getLogger(name).error("once")
    assert len(stream.getvalue().splitlines()) == 4


# -- the daemon, as it runs -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def misbehaving_push_service() -> AsyncIterator[tuple[int, list[str]]]:
    """A push service that completes the Engine.IO and Socket.IO handshakes, then sends what
    a client has to log: an Engine.IO packet out of place, and a Socket.IO event that is not
    JSON."""
    seen: list[str] = []

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        opening = {"sid": "s1", "upgrades": [], "pingInterval": 25000, "pingTimeout": 20000}
        await ws.send_str("0" + json.dumps(opening))
        joining = await ws.receive_str(timeout=10)  # 40/notifications,{...}
        namespace = joining[2:].partition(",")[0]
        await ws.send_str(f'40{namespace},{{"sid":"n1"}}')
        await ws.send_str("5")  # UPGRADE, on a socket that asked for none
        await ws.send_str(f'42{namespace},["notification", not json')
        seen.append(request.query_string)
        async for _ in ws:  # until relayd closes it
            pass
        return ws

    app = web.Application()
    app.router.add_get("/socket.io/", socket)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], seen
    finally:
        await runner.cleanup()


@pytest.mark.timeout(90)
async def test_the_daemons_stderr_is_json_lines_only_and_holds_no_secret(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    relay = RelayProcess(write_config(tmp_path, emulator, receiver))  # json logs, debug level
    async with misbehaving_push_service() as (port, seen):
        emulator.push_base_url = f"http://127.0.0.1:{port}"
        try:
            await relay.start()
            await wait_until(lambda: seen, timeout=30, what="relayd at the push service")
            await wait_until(
                lambda: "malformed notification ignored" in relay.log.read_text(),
                what="the event that is not JSON",
            )
            relay.signal(signal.SIGTERM)
            assert await relay.wait() == 0
        finally:
            await relay.stop()
    text = relay.log.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line, or this fails
    [malformed] = [r for r in records if r["event"] == "malformed notification ignored"]
    assert (malformed["level"], malformed["drive"]) == ("warning", "d1")
    assert "timestamp" in malformed and "not json" not in json.dumps(malformed)  # not echoed
    [unexpected] = [r for r in records if r["event"].startswith("unexpected packet")]
    assert unexpected["what"] == "Engine.IO packet type '5'" and unexpected["drive"]
    assert any(r["event"] == "stopped" for r in records)
    secrets = emulator.issued_secrets()
    assert secrets and f"token={secrets[0]}" in seen[0]  # the credential did travel, unlogged
    assert not any(secret in text for secret in secrets)


# What a failing token helper might print: an access token (a JWT) and an opaque refresh token.
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJ1cG4iOiJhZGFAY29udG9zby5leGFtcGxlIn0.c2lnbmF0dXJlLWJ5dGVz"
OPAQUE = "0.AXYAq8mT3xKz-Hd1ZyQb7LmNpRsTuVwXy"


def test_mask_opaque_masks_long_token_like_words_whatever_their_shape() -> None:
    text = f"jwt {JWT} refresh {OPAQUE} b64 dGhpcyBpcyBhIHNlY3JldCE= ok short-word 15-chars-abcdef"
    assert logs.mask_opaque(text) == (
        f"jwt {logs.REDACTED} refresh {logs.REDACTED} b64 {logs.REDACTED} ok short-word"
        " 15-chars-abcdef"
    )
    assert logs.mask_opaque("login with 0123456789abcdef now") == f"login with {logs.REDACTED} now"
    assert logs.mask_opaque("code 0123456789abcde now") == "code 0123456789abcde now"  # 15


def test_mask_opaque_masks_given_secrets_of_any_length() -> None:
    assert logs.mask_opaque("token abc was refused; abcdef too", ["abc", None, ""]) == (
        f"token {logs.REDACTED} was refused; {logs.REDACTED}def too"
    )


@pytest.mark.timeout(90)
async def test_a_reload_that_changes_the_log_format_or_level_reaches_every_logger(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    """Drives and webhooks the reload leaves alone hold loggers bound at their start."""
    drives = [
        {"name": "d1", "account": "test", "resource": "me", "webhook": "hook"},
        {"name": "d2", "account": "test", "resource": "drives/two", "webhook": "hook"},
    ]
    port = free_port()
    path = tmp_path / "relayd.yaml"
    config = write_daemon_config(
        path, emulator, receiver, state_dir=tmp_path / "state", admin_port=port, drives=drives
    )
    daemon = Daemon(config, port)

    def lines_after(marker: str) -> list[str]:
        text = daemon.log.read_text() if daemon.log.exists() else ""
        return text.split(marker, 1)[1].splitlines()[1:] if marker in text else []

    def reload_with(**log: str) -> None:
        document = yaml.safe_load(path.read_text())
        document["log"].update(log)
        path.write_text(yaml.safe_dump(document))
        daemon.signal(signal.SIGHUP)

    await daemon.start()
    try:
        for resource in ("me", "drives/two"):
            await wait_until(lambda r=resource: emulator.connected(r) == 1, timeout=30)
        await emulator.emit("me")
        await receiver.wait_for(1)
        await wait_until(lambda: daemon.events("delivered"), what="JSON line at debug")

        reload_with(format="console")
        await wait_until(lambda: "config reloaded" in daemon.log.read_text(), what="reloaded")
        await emulator.kick("drives/two")  # the untouched drive d2 logs the lost connection
        await emulator.emit("me")  # and the untouched webhook its delivery, at debug
        await receiver.wait_for(2)

        def console_lines(*words: str) -> list[str]:
            return [
                line for line in lines_after("config reloaded") if all(w in line for w in words)
            ]

        await wait_until(lambda: console_lines("connection lost", "drive=d2"), what="d2's line")
        await wait_until(lambda: console_lines("delivered", "webhook=hook"), what="hook's line")
        after = lines_after("config reloaded")
        assert not [line for line in after if line.startswith("{")], "JSON after the reload"

        reload_with(level="info")
        await wait_until(
            lambda: daemon.log.read_text().count("config reloaded") == 2, what="2nd reload"
        )
        await emulator.emit("me")
        await receiver.wait_for(3)

        # Counted after its line is logged: once the metric says 3, the line would be there.
        async def three_counted() -> bool:
            return await daemon.metric("relayd_deliveries_total") >= 3

        await eventually(three_counted, what="the third delivery counted")
        tail = daemon.log.read_text().rsplit("config reloaded", 1)[1]
        assert "delivered" not in tail and "[debug" not in tail
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.stop()


@pytest.mark.timeout(60)
async def test_start_says_what_runs_where_and_stop_says_what_was_left_waiting(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    receiver.set_default("hook", ScriptedResponse(status=503))  # nothing gets through
    state, config = tmp_path / "state", tmp_path / "relayd.yaml"
    async with running_daemon(tmp_path, emulator, receiver) as daemon:
        port = daemon.admin_port
        await wait_until(lambda: daemon.events("started"), timeout=30, what="started")
        (started,) = daemon.events("started")
        assert started["version"] == relayd.__version__
        assert (started["config"], started["state_dir"]) == (str(config), str(state))
        assert started["store"] == f"sqlite {state / 'outbox.sqlite3'}"
        assert started["admin"] == f"http://127.0.0.1:{port}"
        assert (started["drives"], started["webhooks"], started["accounts"]) == (1, 1, 1)
        await wait_until(lambda: emulator.connected("me") == 1, timeout=30, what="connected")
        await emulator.emit("me", 3)
        await wait_until(lambda: len(receiver.requests) >= 3, what="three attempts")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        (stopped,) = daemon.events("stopped")
        assert (stopped["waiting"], stopped["waiting_per_webhook"]) == (3, {"hook": 3})
