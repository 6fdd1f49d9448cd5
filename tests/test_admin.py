"""The admin server: health, readiness, Prometheus metrics and `relayd status`."""

from __future__ import annotations

import asyncio
import json
import platform
import re
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import StartRelay, relay_config
from prometheus_client.parser import text_string_to_metric_families
from support.waiting import wait_until

import relayd
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


REPO = Path(__file__).resolve().parent.parent
METRICS_DOC = REPO / "docs" / "metrics.md"


def documented_series() -> set[str]:
    """The series named in the first column of docs/metrics.md's tables."""
    return set(re.findall(r"^\| `([a-z_]+)` \|", METRICS_DOC.read_text(), re.MULTILINE))


def exposed_series(text: str) -> set[str]:
    """Every family in a scrape, by the name a query uses (counters with `_total`)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


async def scrape_of_every_kind(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> str:
    """A relay with a notifications drive, a changes-mode drive and a webhook that failed."""
    receiver.script("hook", [ScriptedResponse(status=500)])
    drives = [
        {"name": "d1", "account": "test", "resource": "me", "webhook": "hook"},
        {
            "name": "d2",
            "account": "test",
            "resource": "drives/two",
            "webhook": "hook",
            "mode": "changes",
            "changes": {"quiet_period": 0, "follow_up": 0},
        },
    ]
    relay = await start_relay(admin=ADMIN, drives=drives)
    assert relay.supervisor.admin is not None
    await relay.connected("d1")
    await relay.connected("d2")
    await emulator.change("drives/two")
    await emulator.emit("me")
    await receiver.wait_for(2)
    watcher = relay.watcher("d2")
    assert watcher.feed is not None
    await wait_until(lambda: watcher.feed is not None and watcher.feed.rounds >= 2, what="rounds")
    status, text = await get(relay.supervisor.admin.port, "/metrics")
    assert status == 200
    return text


async def test_every_exported_series_is_documented_and_every_documented_one_exported(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    text = await scrape_of_every_kind(emulator, receiver, start_relay)
    exposed, documented = exposed_series(text), documented_series()
    assert exposed - documented == set(), "exported but not in docs/metrics.md"
    assert documented - exposed == set(), "in docs/metrics.md but not exported"
    assert "_created" not in text
    for line in [
        f'relayd_build_info{{python="{platform.python_version()}",'
        f'version="{relayd.__version__}"}} 1.0',
        'relayd_delta_rounds_total{drive="d2"}',
        'relayd_delta_items_total{drive="d2"} 1.0',
        'relayd_delta_lag_seconds{drive="d2"} 0.0',
        'relayd_drive_backlog{drive="d1"} 0.0',
        'relayd_outbox_dead_letters{webhook="hook"} 0.0',
        'relayd_webhook_failing{webhook="hook"} 1.0',  # one 500, and not five seconds of quiet
    ]:
        assert line in text, line


@pytest.mark.timeout(60)
async def test_promtool_accepts_a_live_scrape(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    text = await scrape_of_every_kind(emulator, receiver, start_relay)
    promtool = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await asyncio.wait_for(promtool.communicate(text.encode()), 30)
    assert promtool.returncode == 0, said.decode()


@pytest.mark.timeout(60)
def test_promtool_checks_the_shipped_alerting_rules_and_their_unit_tests() -> None:
    rules = REPO / "deploy" / "prometheus"
    for command in (
        ["promtool", "check", "rules", "relayd-alerts.yml"],
        ["promtool", "test", "rules", "relayd-alerts.test.yml"],
    ):
        checked = subprocess.run(command, cwd=rules, capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_and_the_alerts_use_only_exported_series() -> None:
    documented = documented_series()
    dashboard = json.loads((REPO / "deploy" / "grafana" / "relayd-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "relayd-alerts.yml").read_text())
    queries += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {
        name for query in queries for name in re.findall(r"\b(?:relayd|process)_[a-z_]+", query)
    }
    # A histogram is queried through its _bucket series.
    used = {name.removesuffix("_bucket") for name in used}
    assert used - documented == set()
    assert len(dashboard["panels"]) >= 10


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
    assert ": bogus: unknown key; expected one of: accounts," in relay.supervisor.last_reload_error
    _, text = await get(port, "/metrics")
    assert 'relayd_config_reloads_total{result="failure"} 1.0' in text
    assert "relayd_config_last_reload_successful 0.0" in text


async def test_relayd_status_says_what_is_stuck_and_why_also_with_the_config_on_disk_broken(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.set_default("hook", ScriptedResponse(status=503))  # the webhook is down
    emulator.inject_error("drives/two", 503, "serviceNotAvailable", count=1000)  # d2 cannot connect
    port = free_port()
    drives = [
        {"name": "d1", "account": "test", "resource": "me", "webhook": "hook"},
        {"name": "d2", "account": "test", "resource": "drives/two", "webhook": "hook"},
    ]
    config = relay_config(
        tmp_path, emulator, receiver, admin={"listen": f"127.0.0.1:{port}"}, drives=drives
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    relay = await start_relay(config)
    await wait_until(lambda: emulator.connected("me") == 1, what="d1 connected")
    await emulator.emit("me", 2)
    await wait_until(lambda: len(receiver.requests) >= 2, what="failed attempts")
    await wait_until(
        lambda: relay.watcher("d2").status.state is DriveState.RECONNECTING, what="d2 retrying"
    )
    await relay.supervisor.refresh_backlog()

    async def status(*extra: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli.main, ["status", "--config", str(path), *extra])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await status()
    assert code == 2  # degraded
    lines = out.splitlines()
    assert lines[0].endswith(": degraded: drive d2 reconnecting, webhook hook failing")
    assert "\033[" not in out  # not a terminal: no colour
    header = next(line for line in lines if line.startswith("DRIVE"))
    assert header.split()[:3] == ["DRIVE", "STATE", "SINCE"]
    d1 = next(line for line in lines if line.startswith("d1 "))
    d2 = next(line for line in lines if line.startswith("d2 "))
    assert " connected " in d1 and " reconnecting " in d2
    assert "503" in d2 and "serviceNotAvailable" in d2  # the reason, not only the state
    hook = next(line for line in lines if line.startswith("hook "))
    assert "failing for " in hook and "HTTP 503" in hook
    account = next(line for line in lines if line.startswith("test "))
    assert "accepted by Graph" in account and "1/2" in account
    # Each tenant's Graph budget: used in the last minute of it, waiting, throttled, paused.
    assert next(line for line in lines if line.startswith("TENANT")).split() == [
        "TENANT",
        "LAST",
        "MINUTE",
        "WAITING",
        "THROTTLED",
        "NOW",
    ]
    tenant = next(line for line in lines if line.startswith("account:test ")).split()
    assert tenant[1].endswith("/600")  # a token_file account is a tenant of its own
    assert tenant[3:] == ["0s", "-"]  # a bare 503 (d2's) is no throttling: no pause

    code, out, _ = await status("--json")
    report = json.loads(out)
    assert code == 2
    assert report["webhooks"]["hook"]["healthy"] is False
    assert report["webhooks"]["hook"]["last_status"] == 503
    assert report["webhooks"]["hook"]["backlog"] == 2
    assert report["drives"]["d1"]["backlog"] == 2  # its own, not its webhook's total
    assert report["drives"]["d2"]["backlog"] == 0
    assert report["drives"]["d2"]["state"] == "reconnecting"

    path.write_text(path.read_text() + "drives: [oops\n")  # a broken edit, not reloaded
    code, out, _ = await status()
    assert code == 2
    assert out.startswith("the config file on disk does not load; the daemon runs its last good")
    assert "invalid YAML" in out
    assert "hook " in out and "d2 " in out
