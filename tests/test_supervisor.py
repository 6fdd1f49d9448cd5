"""Live reload: only what changed is touched; a bad file changes nothing; nothing is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from conftest import TOKEN, StartRelay, seqs, wait_notifications
from support.waiting import wait_until

from relayd.config import load_config
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ScriptedResponse
from relayd.watcher import DriveState

FAST = {"initial_delay": 0.05, "max_delay": 0.3}


def document(
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    tmp_path: Path,
    drives: list[tuple[str, str, str]],
) -> dict[str, Any]:
    (tmp_path / "token").write_text(TOKEN)
    return {
        "graph": {"base_url": emulator.base_url},
        "state_dir": "state",
        "admin": {"listen": ""},
        "accounts": {"test": {"token_file": "token"}},
        "webhooks": {
            "a": {"url": receiver.url("a"), "retry": FAST},
            "b": {"url": receiver.url("b"), "retry": FAST},
        },
        "drives": [
            {"name": name, "account": "test", "resource": resource, "webhook": hook}
            for name, resource, hook in drives
        ],
    }


async def test_reload_touches_only_added_removed_and_changed_drives(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    path = tmp_path / "config.yaml"
    before = [("keep", "me", "a"), ("drop", "drives/x", "a"), ("change", "groups/g", "a")]
    path.write_text(yaml.safe_dump(document(emulator, receiver, tmp_path, before)))
    relay = await start_relay(load_config(path))
    relay.supervisor.config_path = path
    for resource in ("me", "drives/x", "groups/g"):
        await wait_until(lambda r=resource: emulator.connected(r) == 1, what=f"{resource} up")
    kept = relay.watcher("keep")

    after = [("keep", "me", "a"), ("change", "groups/g", "b"), ("new", "sites/s/lists/l", "b")]
    path.write_text(yaml.safe_dump(document(emulator, receiver, tmp_path, after)))
    assert await relay.supervisor.reload()

    await wait_until(lambda: emulator.connected("sites/s/lists/l") == 1, what="new drive up")
    await wait_until(lambda: emulator.connected("drives/x") == 0, what="dropped drive down")
    await wait_until(lambda: emulator.connects["groups/g"] == 2, what="changed drive restarted")
    assert relay.watcher("keep") is kept
    assert emulator.connects["me"] == 1  # never reconnected
    assert emulator.endpoint_requests["me"] == 1
    assert set(relay.supervisor.watchers) == {"keep", "change", "new"}

    await emulator.emit("groups/g")
    await emulator.emit("me")
    # The changed drive now posts to its new webhook.
    assert seqs(await wait_notifications(receiver, 1, name="b")) == [1]
    assert seqs(await wait_notifications(receiver, 1, name="a")) == [1]


async def test_an_invalid_file_on_reload_keeps_the_daemon_relaying(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document(emulator, receiver, tmp_path, [("d1", "me", "a")])))
    relay = await start_relay(load_config(path))
    relay.supervisor.config_path = path
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")

    path.write_text(path.read_text().replace("resource: me", "resourse: me"))
    assert not await relay.supervisor.reload()
    assert relay.supervisor.last_reload_error is not None
    assert "drives[0].resourse: unknown key" in relay.supervisor.last_reload_error
    await wait_until(
        lambda: relay.watcher("d1").status.state is DriveState.CONNECTED, what="still connected"
    )
    await emulator.emit("me")
    assert seqs(await wait_notifications(receiver, 1, name="a")) == [1]
    assert emulator.connects["me"] == 1


async def test_changing_a_webhook_keeps_its_pending_notifications(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    path = tmp_path / "config.yaml"
    config = document(emulator, receiver, tmp_path, [("d1", "me", "a")])
    path.write_text(yaml.safe_dump(config))
    receiver.set_default("a", ScriptedResponse(status=503))
    relay = await start_relay(load_config(path))
    relay.supervisor.config_path = path
    await wait_until(lambda: emulator.connected("me") == 1, what="connected")
    await emulator.emit("me", 5)
    await wait_until(lambda: len(receiver.requests) >= 5, what="attempts under way")

    # The receiver moved: same webhook name, new URL. What was waiting goes to the new one.
    config["webhooks"]["a"]["url"] = receiver.url("moved")
    path.write_text(yaml.safe_dump(config))
    assert await relay.supervisor.reload()
    assert sorted(seqs(await wait_notifications(receiver, 5, name="moved"))) == [1, 2, 3, 4, 5]
    assert emulator.connects["me"] == 1  # the drive itself was not touched
