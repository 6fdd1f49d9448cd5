"""`me`, `groups/{id}` and the other indirect resources are watched through `drives/{id}`.

Some business tenants answer `GET /me/drive/root/subscriptions/socketIo` with 400 notSupported
while `/drives/{id}/...` works (abraunegg/onedrive #3637). relayd looks the drive id up once,
keeps it in the outbox's drives table, and asks for the endpoint and delta through it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import StartRelay, of_type, relay_config, seqs, wait_notifications
from support.waiting import wait_until

from relayd.admin import drive_report
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.store.sqlite import SCHEMA_VERSION
from relayd.watcher import DriveState

SOCKETIO = "root/subscriptions/socketIo"


def paths(emulator: GraphEmulator, tail: str) -> dict[str, int]:
    """Graph requests whose path ends with `tail`, by path."""
    return {path: n for path, n in emulator.graph_paths.items() if path.endswith(tail)}


@pytest.mark.timeout(60)
async def test_me_connects_through_its_drive_id_after_one_lookup_and_none_after_a_restart(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    drive_id = emulator.drive_id("me")
    relay = await start_relay()
    await relay.connected()
    assert emulator.drive_lookups == {"me": 1}
    assert paths(emulator, SOCKETIO) == {f"/v1.0/drives/{drive_id}/{SOCKETIO}": 1}
    await emulator.emit("me", 2)
    delivered = await wait_notifications(receiver, 2)
    # The events keep the name the user wrote.
    assert {json.loads(r.body)["data"]["resource"] for r in delivered} == {"me"}
    report = drive_report(relay.supervisor)["d1"]
    assert report["drive_id"] == drive_id
    await relay.stop()

    again = await start_relay()
    await again.connected()
    assert emulator.drive_lookups == {"me": 1}  # the stored id: Graph is not asked again
    assert paths(emulator, SOCKETIO) == {f"/v1.0/drives/{drive_id}/{SOCKETIO}": 2}
    await emulator.emit("me")
    await wait_notifications(receiver, 3)
    assert sorted(seqs(receiver.delivered("hook"))) == [1, 2, 3]


@pytest.mark.timeout(60)
async def test_a_tenant_that_refuses_me_drive_root_with_not_supported_still_relays(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    emulator.me_not_supported = True  # /me/drive/root/... answers 400 notSupported
    relay = await start_relay()
    await wait_until(
        lambda: relay.watcher().status.state in (DriveState.CONNECTED, DriveState.NOT_SUPPORTED),
        what="the drive connected or refused",
    )
    assert relay.watcher().status.state is DriveState.CONNECTED, relay.watcher().status.last_error
    await emulator.emit("me", 3)
    delivered = await wait_notifications(receiver, 3)
    assert seqs(delivered) == [1, 2, 3]


@pytest.mark.timeout(60)
async def test_a_group_drive_is_looked_up_once_and_watched_through_its_drive_id(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    group = emulator.add_group("Engineering")
    drive_id = emulator.drive_id(group)
    drives = [{"name": "eng", "account": "test", "resource": group, "webhook": "hook"}]
    relay = await start_relay(drives=drives)
    await relay.connected("eng")
    assert emulator.drive_lookups == {group: 1}
    assert paths(emulator, SOCKETIO) == {f"/v1.0/drives/{drive_id}/{SOCKETIO}": 1}
    await emulator.emit(group)
    [delivered] = await wait_notifications(receiver, 1)
    assert delivered.json()["data"]["resource"] == group
    await relay.stop()

    again = await start_relay(drives=drives)
    await again.connected("eng")
    assert emulator.drive_lookups == {group: 1}


@pytest.mark.timeout(60)
async def test_in_changes_mode_delta_goes_through_the_drive_id_too(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    emulator.me_not_supported = True  # delta through /me/drive/root/delta would fail as well
    drive_id = emulator.drive_id("me")
    relay = await start_relay(
        drives=[
            {
                "name": "d1",
                "account": "test",
                "resource": "me",
                "webhook": "hook",
                "mode": "changes",
                "changes": {"quiet_period": 0, "follow_up": 0},
            }
        ]
    )
    await relay.connected()
    changed = await emulator.change("me", 3)
    await wait_until(
        lambda: (
            sum(
                len(json.loads(r.body)["data"]["items"])
                for r in of_type(receiver.delivered("hook"), "drive.changes")
            )
            >= 3
        ),
        what="3 changed items posted",
    )
    posted = [
        item["id"]
        for r in of_type(receiver.delivered("hook"), "drive.changes")
        for item in json.loads(r.body)["data"]["items"]
    ]
    assert sorted(posted) == sorted(changed)
    delta = paths(emulator, "root/delta")
    assert delta and set(delta) == {f"/v1.0/drives/{drive_id}/root/delta"}


@pytest.mark.timeout(60)
async def test_a_failed_lookup_names_the_drive_and_resource_and_is_retried(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    emulator.inject_lookup_error("me", 404, "itemNotFound")
    emulator.inject_lookup_error("me", 200, "not json")  # a captive portal's HTML page
    relay = await start_relay()
    errors: list[str] = []

    def seen() -> bool:
        error = relay.watcher().status.last_error
        if error and error not in errors:
            errors.append(error)
        return relay.watcher().status.state is DriveState.CONNECTED

    await wait_until(seen, timeout=20, what="connected after two failed lookups")
    assert emulator.drive_lookups["me"] == 3
    assert len(errors) == 2
    assert "drive 'd1': cannot look up the drive id of 'me'" in errors[0]
    assert "404 itemNotFound" in errors[0]
    assert "drive 'd1': cannot look up the drive id of 'me'" in errors[1]
    assert "not JSON" in errors[1]


@pytest.mark.timeout(60)
async def test_a_changed_resource_is_looked_up_again(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    await relay.connected()
    await relay.stop()
    group = emulator.add_group("Sales")
    drives = [{"name": "d1", "account": "test", "resource": group, "webhook": "hook"}]
    again = await start_relay(drives=drives)
    await again.connected()
    assert emulator.drive_lookups == {"me": 1, group: 1}
    assert paths(emulator, SOCKETIO) == {
        f"/v1.0/drives/{emulator.drive_id('me')}/{SOCKETIO}": 1,
        f"/v1.0/drives/{emulator.drive_id(group)}/{SOCKETIO}": 1,
    }
    await emulator.emit(group)
    await wait_notifications(receiver, 1)


@pytest.mark.timeout(60)
async def test_drives_by_id_need_no_lookup(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    drives = [{"name": "d1", "account": "test", "resource": "drives/b!abc", "webhook": "hook"}]
    relay = await start_relay(drives=drives)
    await relay.connected()
    assert emulator.drive_lookups == {}
    assert drive_report(relay.supervisor)["d1"]["drive_id"] == "b!abc"


# The outbox as relayd wrote it before drive ids (schema 1), with a drive that ran and a
# notification still waiting for its webhook.
SCHEMA_1 = """
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY, message_id TEXT NOT NULL, webhook TEXT NOT NULL,
    drive TEXT NOT NULL, body BLOB NOT NULL, created REAL NOT NULL, retry_from REAL NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    last_attempt REAL, last_status INTEGER, last_error TEXT, last_latency REAL,
    last_response TEXT, finished REAL
);
CREATE INDEX deliveries_queue ON deliveries (webhook, state, next_attempt, id);
CREATE INDEX deliveries_done ON deliveries (state, finished) WHERE finished IS NOT NULL;
CREATE TABLE drives (
    name TEXT PRIMARY KEY, resource TEXT NOT NULL, cursor TEXT, updated REAL NOT NULL
);
INSERT INTO drives VALUES ('d1', 'me', NULL, 1764190000.0);
INSERT INTO deliveries (message_id, webhook, drive, body, created, retry_from, state,
    next_attempt) VALUES ('msg_old', 'hook', 'd1',
    '{"type":"drive.notification","data":{"drive":"d1","resource":"me"}}',
    1764190000.0, 1764190000.0, 'pending', 0);
PRAGMA user_version = 1;
"""


@pytest.mark.timeout(60)
async def test_a_state_file_from_before_drive_ids_is_migrated_and_keeps_its_queue(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with sqlite3.connect(state / "outbox.sqlite3") as db:
        db.executescript(SCHEMA_1)
    relay = await start_relay(relay_config(tmp_path, emulator, receiver))
    await relay.connected()
    # The waiting notification is delivered, and the drive is known: a restart, not a new one.
    await wait_until(
        lambda: any(r.headers.get("webhook-id") == "msg_old" for r in receiver.delivered("hook")),
        what="the old queued notification delivered",
    )
    await wait_until(
        lambda: len(of_type(receiver.delivered("hook"), "drive.resync")) == 1,
        what="a drive.resync for the restart",
    )
    [resync] = of_type(receiver.delivered("hook"), "drive.resync")
    assert resync.json()["data"]["reason"] == "restart"
    assert emulator.drive_lookups == {"me": 1}
    await relay.stop()
    with sqlite3.connect(state / "outbox.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert db.execute("SELECT resource, drive_id FROM drives").fetchall() == [
            ("me", emulator.drive_id("me"))
        ]
