"""The admin server: health, readiness, Prometheus metrics and `relayd status`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import StartRelay, relay_config
from support.waiting import wait_until

from relayd import cli
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ScriptedResponse
from relayd.watcher import DriveState

ADMIN = {"listen": "127.0.0.1:0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def test_healthz_and_readyz_follow_the_drives(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    emulator.inject_error("me", 503, "serviceNotAvailable", count=3)
    relay = await start_relay(admin=ADMIN)
    assert relay.supervisor.admin is not None
    port = relay.supervisor.admin.port
    assert await get(port, "/healthz") == (200, "ok\n")
    status, body = await get(port, "/readyz")
    assert status == 503  # the drive is still reconnecting
    assert '"d1": "reconnecting"' in body or '"d1": "starting"' in body
    await wait_until(
        lambda: relay.watcher().status.state is DriveState.CONNECTED, what="drive connected"
    )
    status, body = await get(port, "/readyz")
    assert status == 200
    assert '"d1": "connected"' in body


async def test_metrics_name_every_series(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    receiver.script("hook", [ScriptedResponse(status=500)])
    relay = await start_relay(admin=ADMIN)
    assert relay.supervisor.admin is not None
    await relay.connected()
    await emulator.emit("me", 3)
    await emulator.emit("me", raw="garbage")
    await emulator.kick("me")
    await wait_until(lambda: emulator.connected("me") == 1, what="reconnected")
    await receiver.wait_for(4)  # three notifications and the resync after the reconnect
    status, text = await get(relay.supervisor.admin.port, "/metrics")
    assert status == 200
    for line in [
        'relayd_notifications_received_total{drive="d1"} 3.0',
        'relayd_notifications_malformed_total{drive="d1"} 1.0',
        'relayd_deliveries_total{outcome="delivered",webhook="hook"} 4.0',  # + drive.resync
        'relayd_deliveries_total{outcome="retry",webhook="hook"} 1.0',
        'relayd_reconnects_total{drive="d1"} 1.0',
        'relayd_endpoint_renewals_total{drive="d1"} 0.0',
        'relayd_drive_connected{drive="d1"} 1.0',
        'relayd_drive_state{drive="d1",state="connected"} 1.0',
        'relayd_outbox_backlog{webhook="hook"} 0.0',
        'relayd_outbox_oldest_age_seconds{webhook="hook"} 0.0',
        'relayd_token_refreshes_total{account="test"}',
        "relayd_config_last_reload_successful 1.0",
        "relayd_config_last_reload_timestamp_seconds",
        'relayd_delivery_latency_seconds_count{webhook="hook"} 5.0',
    ]:
        assert line in text, line


async def test_a_refused_reload_shows_in_metrics_and_status(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    port = free_port()
    config = relay_config(tmp_path, emulator, receiver, admin={"listen": f"127.0.0.1:{port}"})
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)) + "bogus: 1\n"
    )
    relay = await start_relay(config)
    relay.supervisor.config_path = path
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    assert not await relay.supervisor.reload()
    assert relay.supervisor.last_reload_error is not None
    assert relay.supervisor.last_reload_error.endswith(": bogus: unknown key")
    _, text = await get(port, "/metrics")
    assert 'relayd_config_reloads_total{result="failure"} 1.0' in text
    assert "relayd_config_last_reload_successful 0.0" in text


async def test_relayd_status_prints_a_table_from_the_running_daemon(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    config = relay_config(tmp_path, emulator, receiver, admin={"listen": f"127.0.0.1:{port}"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    await start_relay(config)
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    await emulator.emit("me")
    await receiver.wait_for(1)
    code = await asyncio.to_thread(cli.main, ["status", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0].split() == [
        "drive",
        "state",
        "since",
        "last",
        "notification",
        "backlog",
    ]
    row = out.splitlines()[1].split()
    assert row[0] == "d1"
    assert row[1] == "connected"
    assert row[-1] == "0"
    # Then each tenant's Graph budget: used in the last minute of the budget, and throttling.
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("tenant")))
    assert lines[header].split() == [
        "tenant",
        "last",
        "minute",
        "waiting",
        "throttled",
        "paused",
        "until",
    ]
    tenant = lines[header + 1].split()
    assert tenant[0] == "account:test"  # a token_file account is a tenant of its own
    assert tenant[1] == "1/600"  # the endpoint fetch, and nothing else yet
    assert tenant[2:] == ["0", "0s", "-"]
