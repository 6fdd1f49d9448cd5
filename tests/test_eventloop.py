"""The daemon's event loop: uvloop when installed (a dependency on Linux), asyncio's on request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import Daemon, free_port, write_daemon_config
from support.waiting import wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.eventloop import EventLoopError, choose


@pytest.mark.parametrize(
    ("setting", "installed", "expected"),
    [
        (None, True, "uvloop"),
        ("", True, "uvloop"),
        ("auto", False, "asyncio"),
        (" AsyncIO ", True, "asyncio"),
        ("uvloop", True, "uvloop"),
    ],
)
def test_uvloop_is_chosen_whenever_it_is_installed_unless_asyncio_is_asked_for(
    setting: str | None, installed: bool, expected: str
) -> None:
    assert choose(setting, uvloop_installed=installed) == expected


def test_an_unknown_loop_or_a_missing_uvloop_is_refused_by_name() -> None:
    with pytest.raises(EventLoopError, match="expected one of auto, uvloop, asyncio"):
        choose("trio", uvloop_installed=True)
    with pytest.raises(EventLoopError, match="uvloop is not installed"):
        choose("uvloop", uvloop_installed=False)


@pytest.mark.parametrize(("setting", "expected"), [(None, "uvloop"), ("asyncio", "asyncio")])
@pytest.mark.timeout(60)
async def test_the_daemon_says_which_loop_it_runs_on_and_relays_on_either(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    setting: str | None,
    expected: str,
) -> None:
    port = free_port()
    config = write_daemon_config(
        tmp_path / "relayd.yaml", emulator, receiver, state_dir=tmp_path / "state", admin_port=port
    )
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_EVENT_LOOP"}
    if setting is not None:
        env["RELAYD_EVENT_LOOP"] = setting
    daemon = Daemon(config, port, env=env)
    await daemon.start()
    try:
        await wait_until(lambda: daemon.events("started"), timeout=30, what="started")
        assert daemon.events("started")[0]["loop"] == expected
        await wait_until(lambda: emulator.connected("me") == 1, timeout=30, what="connected")
        await emulator.emit("me")
        await wait_until(lambda: len(receiver.delivered("hook")) == 1, what="delivered")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.stop()


def test_a_bad_setting_stops_the_daemon_before_it_starts(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    config = write_daemon_config(
        tmp_path / "relayd.yaml",
        emulator,
        receiver,
        state_dir=tmp_path / "state",
        admin_port=free_port(),
    )
    done = subprocess.run(
        [sys.executable, "-m", "relayd", "run", "--config", str(config)],
        env={**os.environ, "RELAYD_EVENT_LOOP": "trio"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "RELAYD_EVENT_LOOP='trio': expected one of auto, uvloop, asyncio" in done.stderr
