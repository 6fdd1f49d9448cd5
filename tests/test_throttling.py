"""Graph throttling per tenant, its budget's fair turns, and the safety-net poll, against the
emulator: what reaches Graph (the emulator's request log) and what reaches the webhook."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Relay, StartRelay, relay_config
from support.waiting import wait_until
from test_delta import FAST_CHANGES, changed_ids

from relayd import supervisor as supervisor_module
from relayd.delta import poll_delay
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.graph import GraphClient

TENANTS = {"contoso": ["a1", "a2"], "fabrikam": ["b1"]}


def changes_drive(name: str, account: str, **changes: Any) -> dict[str, Any]:
    return {
        "name": name,
        "account": account,
        "resource": f"drives/{name}",
        "webhook": "hook",
        "mode": "changes",
        "changes": {**FAST_CHANGES, "poll_interval": 0, **changes},
    }


def two_tenants(tmp_path: Path, emulator: GraphEmulator) -> dict[str, Any]:
    """An account per tenant, each with its own token (the emulator knows whose it is)."""
    accounts = {}
    for tenant in TENANTS:
        token = f"token-{tenant}"
        emulator.accept_token(token, tenant=tenant)
        (tmp_path / tenant).write_text(token)
        accounts[tenant] = {"token_file": str(tmp_path / tenant), "throttle_tenant": tenant}
    return accounts


def notification_drives() -> list[dict[str, Any]]:
    """A drive per name in TENANTS, in notifications mode, under its tenant's account."""
    return [
        {"name": d, "account": tenant, "resource": f"drives/{d}", "webhook": "hook"}
        for tenant, names in TENANTS.items()
        for d in names
    ]


async def start_notification_drives(
    tmp_path: Path, emulator: GraphEmulator, start_relay: StartRelay
) -> tuple[Relay, dict[str, Any]]:
    """A relay with `notification_drives()`, all connected; and the accounts it was given."""
    accounts = two_tenants(tmp_path, emulator)
    relay = await start_relay(accounts=accounts, drives=notification_drives())
    for drive in ("a1", "a2", "b1"):
        await relay.connected(drive)
    return relay, accounts


def ids_of(receiver: WebhookReceiver, drive: str) -> list[str]:
    return [
        item["id"]
        for request in receiver.delivered("hook")
        if (body := json.loads(request.body))["type"] == "drive.changes"
        and body["data"]["drive"] == drive
        for item in body["data"]["items"]
    ]


async def admin_get(relay: Relay, path: str) -> Any:
    assert relay.supervisor.admin is not None
    url = f"http://127.0.0.1:{relay.supervisor.admin.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await (response.json() if path == "/status" else response.text())


@pytest.mark.timeout(60)
async def test_a_429_pauses_every_request_of_its_tenant_for_retry_after_and_no_other_tenant(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    accounts = two_tenants(tmp_path, emulator)
    drives = [changes_drive(d, tenant) for tenant, names in TENANTS.items() for d in names]
    relay = await start_relay(accounts=accounts, drives=drives, admin={"listen": "127.0.0.1:0"})
    for drive in ("a1", "a2", "b1"):
        await relay.connected(drive)
        feed = relay.watcher(drive).feed
        assert feed is not None
        await wait_until(lambda feed=feed: feed.rounds >= 1, what=f"{drive}'s catch-up round")

    # One drive's delta page is throttled: Retry-After 3 s.
    emulator.throttle(retry_after=3, resource="drives/a1")
    await emulator.change("drives/a1", 1)
    await wait_until(
        lambda: {r.tenant: r for r in relay.supervisor.tenants()}["contoso"].throttled == 1,
        what="contoso throttled",
    )
    throttled_at = emulator.requests_of("contoso")[-1].at  # the request that got the 429

    # Meanwhile both tenants' drives keep getting changes (and notifications).
    for n in range(10):
        await emulator.change("drives/a2", 1)
        await emulator.change("drives/b1", 1)
        if n == 4:  # half-way through the pause
            asked_at = time.time()
            status = await admin_get(relay, "/status")
            metrics = await admin_get(relay, "/metrics")
        await asyncio.sleep(0.2)  # pacing the changes, not waiting for a result

    await wait_until(lambda: len(ids_of(receiver, "a2")) == 10, timeout=15, what="a2's changes")
    await wait_until(lambda: len(ids_of(receiver, "a1")) == 1, what="a1's change")
    await wait_until(lambda: len(ids_of(receiver, "b1")) == 10, what="b1's changes")

    contoso_after = [r.at for r in emulator.requests_of("contoso") if r.at > throttled_at]
    assert contoso_after, "contoso's drives went on after the pause"
    assert min(contoso_after) >= throttled_at + 3.0  # nothing of contoso's in the 3 s
    fabrikam_during = [
        r for r in emulator.requests_of("fabrikam") if throttled_at < r.at < throttled_at + 3.0
    ]
    assert len(fabrikam_during) >= 5  # b1's rounds went on meanwhile
    assert all(emulator.connected(f"drives/{d}") == 1 for d in ("a1", "a2", "b1"))  # sockets up
    assert relay.watcher("a2").status.reconnects == 0

    # Visible: /status and the metrics say who is paused, for how long, and the budget.
    assert status["drives"]["a2"]["tenant"] == "contoso"
    contoso = status["tenants"]["contoso"]
    assert contoso["throttled"] == 1
    assert contoso["throttled_until"] is not None
    assert asked_at < contoso["throttled_until"] < asked_at + 3.0
    assert contoso["budget_per_minute"] == 600
    assert contoso["waiting"] >= 1  # a2's round, waiting for the pause to end
    assert status["tenants"]["fabrikam"]["throttled"] == 0
    assert status["tenants"]["fabrikam"]["used_last_minute"] >= 5
    assert 'relayd_graph_throttled_total{tenant="contoso"} 1.0' in metrics
    assert 'relayd_graph_budget_per_minute{tenant="fabrikam"} 600.0' in metrics
    assert 'relayd_graph_requests_waiting{tenant="contoso"}' in metrics
    after = {r.tenant: r for r in relay.supervisor.tenants()}["contoso"]
    assert 2.9 <= after.throttled_seconds <= 3.5
    assert after.throttled_until is None


@pytest.mark.timeout(60)
async def test_a_429_to_an_endpoint_fetch_holds_back_the_tenants_reconnects_only(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay, _ = await start_notification_drives(tmp_path, emulator, start_relay)
    emulator.throttle(retry_after=2, resource="drives/a1")
    await emulator.kick("drives/a1")  # its reconnect's endpoint fetch is throttled
    await wait_until(
        lambda: {r.tenant: r for r in relay.supervisor.tenants()}["contoso"].throttled == 1,
        what="a1's endpoint fetch throttled",
    )
    throttled_at = emulator.requests_of("contoso")[-1].at
    await emulator.kick("drives/a2")
    await emulator.kick("drives/b1")

    def back(drive: str) -> bool:
        return emulator.connects[f"drives/{drive}"] == 2 and emulator.connected(f"drives/{drive}")

    await wait_until(lambda: back("b1"), what="b1 reconnected")
    b1_back = time.monotonic()
    await wait_until(lambda: back("a2") and back("a1"), what="a1 and a2 reconnected")
    assert b1_back < throttled_at + 2.0  # the other tenant reconnected during the pause
    a2_fetch = [r.at for r in emulator.requests_of("contoso") if r.resource == "drives/a2"][-1]
    assert a2_fetch >= throttled_at + 2.0  # a2's endpoint fetch waited for the pause's end


@pytest.mark.timeout(60)
async def test_a_drive_waiting_out_its_tenants_pause_is_removed_and_stopped_at_once(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    # A stop used to wait for the attempt under way: a drive whose endpoint fetch waited out
    # its tenant's Retry-After held a reload (or SIGTERM, or a cluster hand-over) for the
    # watchers' stop bound, then was cut short.
    relay, accounts = await start_notification_drives(tmp_path, emulator, start_relay)

    def contoso() -> Any:
        return {r.tenant: r for r in relay.supervisor.tenants()}["contoso"]

    emulator.throttle(retry_after=120, resource="drives/a1")
    await emulator.kick("drives/a1")
    await wait_until(lambda: contoso().throttled == 1, what="contoso paused for two minutes")
    await emulator.kick("drives/a2")
    await wait_until(lambda: contoso().waiting >= 1, what="a2's reconnect in contoso's line")
    fetches = emulator.endpoint_requests["drives/a2"]
    kept = [d for d in notification_drives() if d["name"] != "a2"]
    started = time.monotonic()
    assert await relay.supervisor.reload(
        relay_config(tmp_path, emulator, receiver, accounts=accounts, drives=kept)
    )
    took = time.monotonic() - started
    assert "a2" not in relay.supervisor.watchers
    assert took < supervisor_module.WATCHER_STOP_TIMEOUT, took  # not cut short at the bound
    assert contoso().waiting == 0  # its place in the line is given up with it
    assert emulator.endpoint_requests["drives/a2"] == fetches  # and nothing of it reached Graph
    assert contoso().throttled_until is not None  # all while the pause still runs
    await emulator.emit("drives/b1")  # the others relay on
    await wait_until(lambda: len(receiver.delivered("hook")) == 1, what="b1's notification")


def test_the_poll_comes_due_within_its_interval_jittered_by_up_to_a_fifth() -> None:
    assert poll_delay(3600, lambda: 0.0) == 3600
    assert poll_delay(3600, lambda: 0.999) == pytest.approx(3600 * 0.8, rel=1e-3)
    spread = {round(poll_delay(3600)) for _ in range(200)}
    assert min(spread) >= 2880 and max(spread) <= 3600 and len(spread) > 100


@pytest.mark.timeout(30)
async def test_a_change_graph_never_notifies_about_is_delivered_within_poll_interval(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    drive = changes_drive("d1", "test", poll_interval=1.5)
    drive["resource"] = "me"
    relay = await start_relay(drives=[drive])
    feed = relay.watcher().feed
    assert feed is not None
    await relay.connected()
    await wait_until(lambda: feed.rounds >= 1, what="catch-up round")
    for n in range(3):
        changed_at = time.monotonic()
        await emulator.change("me", 1, notify=0)  # Graph says nothing
        await wait_until(lambda n=n: len(changed_ids(receiver)) == n + 1, what="the change")
        assert time.monotonic() - changed_at <= 1.5 + 0.5  # within poll_interval (+ delivery)
    assert relay.watcher().status.received == 0  # no notification brought any of them
    assert feed.polls >= 3


@pytest.mark.timeout(60)
async def test_a_drive_paging_through_a_long_delta_does_not_starve_another_drives_round(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A budget that binds within a test: 4 requests a second (a 1 s "minute"), one tenant.
    monkeypatch.setattr(supervisor_module, "GraphClient", functools.partial(GraphClient, window=1))
    drives = [changes_drive("long", "test"), changes_drive("short", "test")]
    config = relay_config(
        tmp_path,
        emulator,
        receiver,
        drives=drives,
        graph={"base_url": emulator.base_url, "requests_per_minute": 4},
    )
    relay = await start_relay(config)
    for name in ("long", "short"):
        await relay.connected(name)
    emulator.delta_page_size = 1
    await emulator.change("drives/long", 40)  # 40 pages at 4 a second: 10 s of paging
    await wait_until(lambda: len(ids_of(receiver, "long")) >= 4, what="long's paging started")
    await emulator.change("drives/short", 1)
    started = time.monotonic()
    await wait_until(lambda: len(ids_of(receiver, "short")) == 1, what="short's round")
    assert time.monotonic() - started < 3.0  # its turn came within a few of long's pages
    assert len(ids_of(receiver, "long")) < 40  # while long was still paging
    await wait_until(lambda: len(ids_of(receiver, "long")) == 40, timeout=30, what="long done")
