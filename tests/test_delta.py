"""Changes mode: delta rounds, coalescing, catch-up after any gap, resync, crash safety."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import StartRelay, of_type, relay_config
from structlog.testing import capture_logs
from support.waiting import wait_until
from test_cli import RelayProcess, write_config

import relayd.delta
from relayd import admin, status_view
from relayd.emulator import GraphEmulator, WebhookReceiver

# Every test on both stores (support.stores).
pytestmark = pytest.mark.usefixtures("store_backend")

FAST_CHANGES = {"quiet_period": 0.2, "max_delay": 2, "follow_up": 0}


def changes_drive(**changes: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "d1",
            "account": "test",
            "resource": "me",
            "webhook": "hook",
            "mode": "changes",
            "changes": {**FAST_CHANGES, **changes},
        }
    ]


def changed_items(receiver: WebhookReceiver) -> list[dict[str, Any]]:
    """Every driveItem posted in drive.changes bodies, in arrival order."""
    return [
        item
        for request in of_type(receiver.delivered("hook"), "drive.changes")
        for item in request.json()["data"]["items"]
    ]


def changed_ids(receiver: WebhookReceiver) -> list[str]:
    return [item["id"] for item in changed_items(receiver)]


async def test_first_start_takes_a_baseline_then_posts_the_changed_items(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    await emulator.change("me", 5, notify=0)  # before relayd: not posted
    relay = await start_relay(drives=changes_drive())
    feed = relay.watcher().feed
    assert feed is not None
    await wait_until(lambda: feed.rounds == 1, what="catch-up round after connect")
    await emulator.change("me", 3)
    await wait_until(lambda: len(changed_ids(receiver)) == 3, what="three changes")
    assert changed_ids(receiver) == ["ITEM0000006", "ITEM0000007", "ITEM0000008"]
    body = of_type(receiver.delivered("hook"), "drive.changes")[0].json()
    assert body["type"] == "drive.changes"
    assert body["data"]["drive"] == "d1"
    assert body["data"]["resource"] == "me"
    assert of_type(receiver.delivered("hook")) == []  # no raw notifications in changes mode


async def test_initial_sync_posts_every_item_in_bodies_of_max_items(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    await emulator.change("me", 450, notify=0)
    await start_relay(drives=changes_drive(initial_sync=True, max_items=200))
    await wait_until(lambda: len(changed_ids(receiver)) == 450, what="all 450 items")
    assert sorted(changed_ids(receiver)) == [f"ITEM{n:07d}" for n in range(1, 451)]
    sizes = sorted(
        len(r.json()["data"]["items"]) for r in of_type(receiver.delivered("hook"), "drive.changes")
    )
    assert sizes == [50, 200, 200]


async def test_a_burst_of_20_notifications_gives_one_round(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay(drives=changes_drive(quiet_period=0.3))
    feed = relay.watcher().feed
    assert feed is not None
    await wait_until(lambda: feed.rounds == 1, what="catch-up round")
    requests_before = emulator.delta_requests["me"]
    await emulator.change("me", 1, notify=20)
    await wait_until(lambda: len(changed_ids(receiver)) == 1, what="the change")
    await wait_until(lambda: feed.rounds == 2, what="second round")
    assert emulator.delta_requests["me"] == requests_before + 1
    assert relay.watcher().status.received == 20


async def test_a_steady_stream_still_flows_within_max_delay(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay(drives=changes_drive(quiet_period=0.5, max_delay=1))
    feed = relay.watcher().feed
    assert feed is not None
    await wait_until(lambda: feed.rounds == 1, what="catch-up round")
    # A notification every 0.2 s never leaves 0.5 s of quiet; max_delay still forces rounds.
    for _ in range(15):
        await emulator.change("me", 1)
        await asyncio.sleep(0.2)  # pacing the sender, not waiting for a result
    assert len(changed_ids(receiver)) >= 5  # delivered while the stream was still going
    await wait_until(lambda: len(changed_ids(receiver)) == 15, what="all 15")


async def test_follow_up_round_catches_what_the_first_missed(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay(drives=changes_drive(follow_up=0.5))
    feed = relay.watcher().feed
    assert feed is not None
    await wait_until(lambda: feed.rounds == 1, what="catch-up round")
    await emulator.emit("me")  # the notification outruns the change...
    await wait_until(lambda: feed.rounds == 2, what="an empty round")
    assert changed_ids(receiver) == []
    await emulator.change("me", 1, notify=0)  # ...which becomes visible a moment later
    await wait_until(lambda: changed_ids(receiver) == ["ITEM0000001"], what="follow-up")
    assert feed.rounds == 3


async def test_changes_made_while_disconnected_arrive_after_the_reconnect(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay(drives=changes_drive())
    await relay.connected()
    emulator.inject_error("me", 503, "serviceNotAvailable", count=2)  # keep it away a while
    await emulator.kick("me")
    await wait_until(lambda: emulator.connected("me") == 0, what="disconnected")
    await emulator.change("me", 4)  # the notification reaches nobody
    await wait_until(lambda: emulator.connects["me"] == 2, what="reconnected")
    await wait_until(lambda: len(changed_ids(receiver)) == 4, what="caught up")
    assert relay.watcher().status.reconnects == 1


async def test_changes_made_while_relayd_was_stopped_arrive_after_restart(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    config = relay_config(tmp_path, emulator, receiver, drives=changes_drive())
    relay = await start_relay(config)
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    await emulator.change("me", 2)
    await wait_until(lambda: len(changed_ids(receiver)) == 2, what="first changes")
    await relay.stop()
    await emulator.change("me", 3)  # while relayd is down
    await start_relay(config)
    await wait_until(lambda: len(changed_ids(receiver)) == 5, what="changes from the gap")
    assert changed_ids(receiver) == [f"ITEM{n:07d}" for n in range(1, 6)]


async def test_deleted_items_keep_their_deleted_facet_and_select_limits_fields(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    [first] = await emulator.change("me", 1, notify=0)
    relay = await start_relay(drives=changes_drive(select=["id", "name", "deleted"]))
    feed = relay.watcher().feed
    assert feed is not None
    await wait_until(lambda: feed.rounds == 1, what="catch-up round")
    await emulator.change("me", 1, delete=[first])
    await wait_until(lambda: len(changed_items(receiver)) == 2, what="two changes")
    items = {item["id"]: item for item in changed_items(receiver)}
    assert items[first] == {"id": first, "name": "file1.txt", "deleted": {"state": "deleted"}}
    assert set(items["ITEM0000002"]) == {"id", "name"}


@pytest.mark.parametrize("with_location", [False, True])
async def test_410_resync_is_followed_and_announced(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay, with_location: bool
) -> None:
    relay = await start_relay(drives=changes_drive())
    feed = relay.watcher().feed
    assert feed is not None
    await wait_until(lambda: feed.rounds == 1, what="catch-up round")
    await emulator.change("me", 2, notify=0)
    # Graph says: start again (from the Location it gives: here a full enumeration).
    location = f"{emulator.base_url}/me/drive/root/delta" if with_location else None
    emulator.inject_delta_error("me", 410, "resyncChangesApplyDifferences", location=location)
    await emulator.emit("me")
    await wait_until(lambda: of_type(receiver.delivered("hook"), "drive.resync"), what="resync")
    [resync] = of_type(receiver.delivered("hook"), "drive.resync")
    assert resync.json()["data"]["reason"] == "delta resyncChangesApplyDifferences"
    if with_location:  # the full enumeration posts what exists
        await wait_until(lambda: len(changed_ids(receiver)) == 2, what="enumeration")
    await emulator.change("me", 1)
    await wait_until(lambda: "ITEM0000003" in changed_ids(receiver), what="later changes flow")


async def test_throttled_delta_page_honours_retry_after_and_loses_nothing(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay(drives=changes_drive())
    feed = relay.watcher().feed
    assert feed is not None
    await wait_until(lambda: feed.rounds == 1, what="catch-up round")
    emulator.inject_delta_error("me", 429, "TooManyRequests", retry_after=1)
    await emulator.change("me", 3)
    await wait_until(lambda: len(changed_ids(receiver)) == 3, what="changes after 429")


async def test_kill_9_between_a_delta_page_and_its_commit_neither_loses_nor_repeats(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    emulator.delta_page_size = 100
    config = write_config(tmp_path, emulator, receiver)
    document = config.read_text().replace(
        "resource: me",
        "resource: me\n  mode: changes\n  changes: {quiet_period: 0.1, follow_up: 0}",
    )
    config.write_text(document)
    relay = RelayProcess(config)
    try:
        await relay.start()
        await wait_until(
            lambda: emulator.delta_requests["me"] >= 2, timeout=20, what="baseline and catch-up"
        )
        await emulator.change("me", 150)
        await wait_until(lambda: len(changed_ids(receiver)) == 150, what="first 150")
        # The next round's first page goes out half-way and stalls: relayd has it in hand
        # but has not committed it when it is killed.
        release = emulator.hold_delta("me")
        requests = emulator.delta_requests["me"]
        await emulator.change("me", 250)
        await wait_until(lambda: emulator.delta_requests["me"] > requests, what="page asked for")
        relay.signal(signal.SIGKILL)
        await relay.wait()
        release.set()
        await relay.start()
        await wait_until(lambda: len(changed_ids(receiver)) >= 400, timeout=20, what="all 400")
        ids = changed_ids(receiver)
        assert len(ids) == len(set(ids)) == 400
    finally:
        await relay.stop()


async def test_a_long_first_sync_reports_its_progress_in_the_log_status_and_metrics(
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relayd.delta, "PROGRESS_EVERY", 0.0)  # a line per page, not per 10 s
    emulator.delta_page_size = 50
    await emulator.change("me", 450, notify=0)
    release = emulator.hold_delta("me")  # the first page stalls: the round is under way
    with capture_logs() as logged:
        relay = await start_relay(
            drives=changes_drive(initial_sync=True), admin={"listen": "127.0.0.1:0"}
        )
        feed = relay.watcher().feed
        assert feed is not None
        await wait_until(
            lambda: (
                feed.progress is not None and feed.progress.fields(time.monotonic())["seconds"] >= 1
            ),
            what="a round under way for a second",
        )
        report = admin.drive_report(relay.supervisor)["d1"]["delta"]
        assert report["round"]["reason"] == "start" and report["round"]["pages"] == 0
        screen = status_view.render(
            {"drives": {"d1": {**admin.drive_report(relay.supervisor)["d1"]}}},
            now=time.time(),
            color=False,
        )
        assert "d1: delta round (start) running for 1s: 0 pages, 0 items" in screen
        release.set()
        await wait_until(lambda: len(changed_ids(receiver)) == 450, what="all 450 items")
        await wait_until(lambda: feed.progress is None, what="round over")
    progress = [line for line in logged if line["event"] == "delta round in progress"]
    assert [line["pages"] for line in progress] == list(range(1, 10))
    assert [line["items"] for line in progress] == [50 * n for n in range(1, 10)]
    (done,) = [line for line in logged if line["event"] == "delta round"][:1]
    assert (done["pages"], done["items"]) == (9, 450) and done["items_per_second"] > 0
    assert relay.supervisor.admin is not None
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{relay.supervisor.admin.port}/metrics"
        async with session.get(url) as response:
            text = await response.text()
    assert 'relayd_delta_pages_total{drive="d1"}' in text
    assert 'relayd_delta_round_seconds{drive="d1"} 0.0' in text
