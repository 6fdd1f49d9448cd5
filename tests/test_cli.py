"""The `relayd` command as a user runs it: real subprocesses, signals, a crash, config checks."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from conftest import TOKEN, of_type, seqs, wait_notifications
from support import configs
from support.daemon import Daemon
from support.waiting import wait_until

from relayd import cli
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.graph import build_parser as build_emulator_parser
from relayd.emulator.receiver import ScriptedResponse


def write_config(tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver) -> Path:
    (tmp_path / "token").write_text(TOKEN)
    config = {
        "graph": {"base_url": emulator.base_url},
        "state_dir": "state",
        "admin": {"listen": ""},
        "log": {"level": "debug", "format": "json"},
        "accounts": {"test": {"token_file": "token"}},
        "webhooks": {
            "hook": {
                "url": receiver.url("hook"),
                "retry": {"initial_delay": 0.05, "max_delay": 0.3},
            }
        },
        "drives": [{"name": "d1", "account": "test", "resource": "me", "webhook": "hook"}],
        # support.stores.store_backend's PostgreSQL database, for a test that runs on it.
        **({"store": {"url": configs.STORE["url"]}} if configs.STORE["url"] else {}),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class RelayProcess(Daemon):
    """`relayd run` in a subprocess, its log in a file; these configs have no admin server."""

    def __init__(self, config: Path) -> None:
        super().__init__(config, admin_port=0)


@pytest.fixture
async def relay_process(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(write_config(tmp_path, emulator, receiver))
    yield relay
    await relay.stop()


def outbox_states(state_dir: Path) -> dict[str, int]:
    path = state_dir / "outbox.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())


async def test_kill_9_with_undelivered_notifications_then_restart_delivers_them_all(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    relay_process: RelayProcess,
) -> None:
    receiver.set_default("hook", ScriptedResponse(status=503))  # the webhook is down
    await relay_process.start()
    await wait_until(lambda: emulator.connected("me") == 1, timeout=20, what="relay connected")
    await emulator.emit("me", 25)
    await wait_until(
        lambda: sum(outbox_states(tmp_path / "state").values()) == 25,
        what="25 notifications in the outbox",
    )
    relay_process.signal(signal.SIGKILL)
    assert await relay_process.wait() == -signal.SIGKILL
    assert receiver.delivered("hook") == []

    receiver.set_default("hook", ScriptedResponse(status=200))  # the webhook is back
    await relay_process.start()
    delivered = await wait_notifications(receiver, 25, timeout=20)
    assert sorted(seqs(delivered)) == list(range(1, 26))
    await wait_until(
        lambda: outbox_states(tmp_path / "state") == {"delivered": 26}, what="all marked delivered"
    )
    # Notifications sent while relayd was down are gone: receivers are told to look.
    [resync] = of_type(receiver.delivered("hook"), "drive.resync")
    assert resync.json()["data"] == {"drive": "d1", "resource": "me", "reason": "restart"}


async def test_sigterm_stops_within_seconds_exits_0_and_loses_nothing(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    relay_process: RelayProcess,
) -> None:
    receiver.set_default("hook", ScriptedResponse(status=503))
    await relay_process.start()
    await wait_until(lambda: emulator.connected("me") == 1, timeout=20, what="relay connected")
    await emulator.emit("me", 10)
    await wait_until(
        lambda: sum(outbox_states(tmp_path / "state").values()) == 10,
        what="10 notifications in the outbox",
    )
    stopping = time.monotonic()
    relay_process.signal(signal.SIGTERM)
    assert await relay_process.wait(timeout=15) == 0
    assert time.monotonic() - stopping < 10
    assert emulator.connected("me") == 0
    assert outbox_states(tmp_path / "state") == {"pending": 10}  # nothing left "in flight"

    receiver.set_default("hook", ScriptedResponse(status=200))
    await relay_process.start()
    assert sorted(seqs(await wait_notifications(receiver, 10, timeout=20))) == list(range(1, 11))
    relay_process.signal(signal.SIGINT)
    assert await relay_process.wait() == 0


async def test_no_secret_reaches_the_log(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    relay_process: RelayProcess,
) -> None:
    await relay_process.start()
    await wait_until(lambda: emulator.connected("me") == 1, timeout=20, what="relay connected")
    await emulator.kick("me")  # a reconnect logs the most: errors, endpoints, retries
    await wait_until(lambda: emulator.connects["me"] == 2, what="reconnected")
    await emulator.emit("me")
    await wait_notifications(receiver, 1)
    relay_process.signal(signal.SIGTERM)
    assert await relay_process.wait() == 0
    log = relay_process.log.read_text()
    assert "connected" in log
    assert TOKEN not in log
    for secret in emulator.issued_secrets():
        assert secret not in log


def run_cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "relayd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "RELAYD_CONFIG": ""},
    )
    return result.returncode, result.stdout, result.stderr


def test_check_config_accepts_a_good_file_and_names_the_line_of_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "accounts: {ci: {token_command: echo t}}\n"
        "webhooks: {w: {url: 'http://127.0.0.1:1/x'}}\n"
        "drives:\n  - {name: a, account: ci, resource: me, webhook: w}\n"
    )
    code, out, _ = run_cli("check-config", "--config", str(good))
    assert code == 0
    assert "1 drives" in out

    bad = tmp_path / "config.yaml"
    bad.write_text(good.read_text().replace("resource: me", "resourse: me"))
    code, _, err = run_cli("check-config", "--config", str(bad))
    assert code == 1
    assert f"{bad}:4: drives[0].resourse: unknown key" in err


def test_check_config_refuses_an_unreadable_token_file_that_run_would_wait_for(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "accounts: {ci: {token_file: token}}\n"
        "webhooks: {w: {url: 'http://127.0.0.1:1/x'}}\n"
        "drives:\n  - {name: a, account: ci, resource: me, webhook: w}\n"
    )
    code, _, err = run_cli("check-config", "--config", str(path))
    assert code == 1
    assert (
        err
        == f"{path}:1: accounts.ci.token_file: cannot read the file: No such file or directory\n"
    )

    (tmp_path / "token").write_text("t")
    code, out, _ = run_cli("check-config", "--config", str(path))
    assert code == 0, out


def test_check_config_refuses_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# to be written\n")
    code, _, err = run_cli("check-config", "--config", str(path))
    assert code == 1
    assert "the file is empty" in err


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = run_cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "nope.yaml: no such config file" in err


def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    code, out, _ = run_cli("demo", "--count", "3", "--interval", "0.2", cwd=tmp_path)
    assert code == 0
    assert out.count("webhook received drive.notification") >= 3
    assert out.count("signature=verified") >= 3
    assert "INVALID" not in out


async def test_relayd_reload_adds_a_drive_without_touching_the_running_one(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, relay_process: RelayProcess
) -> None:
    await relay_process.start()
    await wait_until(lambda: emulator.connected("me") == 1, timeout=20, what="relay connected")
    document = yaml.safe_load(relay_process.config.read_text())
    document["drives"].append(
        {"name": "d2", "account": "test", "resource": "drives/second", "webhook": "hook"}
    )
    relay_process.config.write_text(yaml.safe_dump(document))

    code, out, err = await asyncio.to_thread(
        run_cli, "reload", "--config", str(relay_process.config)
    )
    assert code == 0, err
    assert "asked relayd (pid" in out
    await wait_until(lambda: emulator.connected("drives/second") == 1, what="new drive up")
    assert emulator.connects["me"] == 1  # the first drive's connection stayed up
    await emulator.emit("drives/second")
    [delivered] = await wait_notifications(receiver, 1)
    assert delivered.json()["data"]["drive"] == "d2"


def test_relayd_reload_without_a_daemon_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("state_dir: state\n")
    code, _, err = run_cli("reload", "--config", str(config))
    assert code == 1
    assert "no relayd is running with state_dir" in err


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def test_every_command_describes_itself_and_its_exit_codes() -> None:
    for name, sub in subcommands().items():
        text = sub.format_help()
        assert sub.description, name
        assert "exit codes:\n  0  " in text, name


def test_the_readme_lists_every_command() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [name for name in subcommands() if f"`relayd {name}" not in readme]
    assert missing == []


def test_config_is_accepted_before_or_after_the_command(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "accounts: {ci: {token_command: echo t}}\n"
        "webhooks: {w: {url: 'http://127.0.0.1:1/x'}}\n"
        "drives:\n  - {name: a, account: ci, resource: me, webhook: w}\n"
    )
    for argv in (("-c", str(path), "check-config"), ("check-config", "--config", str(path))):
        code, out, err = run_cli(*argv)
        assert (code, out) == (0, f"{path}: ok (1 drives, 1 webhooks, 1 accounts)\n"), err
    code, out, _ = run_cli("--version")
    assert code == 0 and out.startswith("relayd ")


def test_the_emulator_is_a_command_with_its_own_help() -> None:
    code, out, _ = run_cli("emulator", "--help")
    assert code == 0
    assert out.startswith("usage: relayd emulator")
    for option in ("--port", "--token", "--lifetime", "--ping-interval"):
        assert option in out
    undocumented = [
        action.option_strings
        for action in build_emulator_parser()._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert undocumented == []
