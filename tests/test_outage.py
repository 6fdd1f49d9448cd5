"""Outage: a failing webhook or drive as a few log lines: the pure logic, then a real daemon."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support.daemon import Daemon, free_port, write_daemon_config
from support.waiting import wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ScriptedResponse
from relayd.outage import Outage, Report, spell


def test_spell_writes_durations_as_people_do() -> None:
    assert [spell(s) for s in (0, 45.4, 252, 3600, 7380, 3 * 86400 + 4000)] == [
        "0s",
        "45s",
        "4m12s",
        "1h0m",
        "2h3m",
        "3d1h",
    ]


def test_one_line_when_it_starts_then_at_most_one_a_minute() -> None:
    outage = Outage(summary_every=60, settle=5)
    reports = [outage.failed(float(t), f"HTTP 50{t % 3}") for t in range(0, 150)]
    said = [(t, r) for t, r in enumerate(reports) if r is not None]
    assert said == [
        (0, Report("failing", {"error": "HTTP 500"})),
        (
            60,
            Report(
                "still failing",
                {"for": "1m00s", "failed_attempts": 60, "delivered": 0, "error": "HTTP 500"},
            ),
        ),
        (
            120,
            Report(
                "still failing",
                {"for": "2m00s", "failed_attempts": 60, "delivered": 0, "error": "HTTP 500"},
            ),
        ),
    ]
    assert outage.failing_since == 0.0


def test_recovered_after_a_quiet_spell_with_the_outage_counted() -> None:
    outage = Outage(summary_every=60, settle=5)
    assert outage.failed(10.0, "timeout after 15s") is not None
    for t in range(11, 40):
        outage.failed(float(t), "timeout after 15s")
    # One success is not yet a recovery (the summary that was due says so)...
    summary = outage.succeeded(262.0)
    assert summary is not None and summary.kind == "still failing"
    assert summary.fields["delivered"] == 1
    assert outage.succeeded(263.0) is None
    assert outage.tick(266.9) is None
    report = outage.tick(267.0, waiting=3)  # ...five quiet seconds are
    assert report == Report("recovered", {"after": "4m12s", "failed_attempts": 30, "delivered": 2})
    assert not outage.failing and outage.last_error is None
    assert outage.succeeded(268.0) is None and outage.tick(400.0) is None


def test_a_webhook_that_fails_every_other_request_stays_failing() -> None:
    outage = Outage(summary_every=60, settle=5)
    kinds = []
    for t in range(0, 130):
        report = outage.succeeded(float(t)) if t % 2 else outage.failed(float(t), "HTTP 503")
        if report is not None:
            kinds.append((t, report.kind, report.fields.get("delivered")))
    assert kinds == [(0, "failing", None), (60, "still failing", 30), (120, "still failing", 30)]


def test_a_summary_is_due_even_when_no_attempt_is_made() -> None:
    outage = Outage(summary_every=60, settle=5)
    outage.failed(0.0, "HTTP 500")
    assert outage.tick(30.0, waiting=12) is None
    report = outage.tick(61.0, waiting=12)
    assert report is not None and report.kind == "still failing"
    assert report.fields["waiting"] == 12


# --------------------------------------------------------------------------- a real daemon


@pytest.mark.timeout(90)
async def test_an_outage_of_many_attempts_logs_one_failing_line_and_one_recovered_line(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    failures = 40
    receiver.script("hook", [ScriptedResponse(status=503)] * failures)
    port = free_port()
    config = write_daemon_config(
        tmp_path / "relayd.yaml", emulator, receiver, state_dir=tmp_path / "state", admin_port=port
    )
    daemon = Daemon(config, port)
    await daemon.start()
    try:
        await wait_until(lambda: emulator.connected("me") == 1, timeout=30, what="connected")
        await emulator.emit("me", 5)
        await receiver.wait_for(5, timeout=30)
        await wait_until(lambda: daemon.events("recovered"), timeout=30, what="recovered line")

        failing = daemon.events("is failing")
        assert [(line["level"], line["webhook"], line["error"]) for line in failing] == [
            ("warning", "hook", "HTTP 503")
        ]
        assert failing[0]["event"] == "webhook hook is failing"
        (recovered,) = daemon.events("recovered")
        assert recovered["event"] == "webhook hook recovered"
        assert (recovered["failed_attempts"], recovered["delivered"]) == (failures, 5)
        # Each attempt is still there for whoever turns debug on, but never above it.
        attempts = daemon.events("delivery failed, will retry")
        assert len(attempts) == failures
        assert {line["level"] for line in attempts} == {"debug"}
        assert not daemon.events("still failing")  # the outage lasted well under a minute
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.stop()


@pytest.mark.timeout(90)
async def test_a_drive_that_cannot_connect_for_a_while_logs_one_failing_and_one_recovered_line(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    emulator.inject_error("me", 503, "serviceNotAvailable", count=3)
    port = free_port()
    config = write_daemon_config(
        tmp_path / "relayd.yaml", emulator, receiver, state_dir=tmp_path / "state", admin_port=port
    )
    daemon = Daemon(config, port)
    await daemon.start()
    try:
        await wait_until(lambda: emulator.connected("me") == 1, timeout=40, what="connected")
        await wait_until(lambda: daemon.events("recovered"), timeout=30, what="recovered line")
        failing = daemon.events("is failing")
        assert [(line["event"], line["level"]) for line in failing] == [
            ("drive d1 is failing", "warning")
        ]
        assert "503" in failing[0]["error"]
        (recovered,) = daemon.events("recovered")
        assert recovered["event"] == "drive d1 recovered"
        assert recovered["failed_attempts"] == 3
        assert {line["level"] for line in daemon.events("cannot connect, will retry")} == {"debug"}
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.stop()
