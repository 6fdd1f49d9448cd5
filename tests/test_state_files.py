"""State files are relayd's user's alone: they hold tenant ids, notification bodies, answers."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
from support.daemon import Daemon, free_port, write_daemon_config
from support.waiting import wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver


@pytest.mark.timeout(60)
async def test_a_daemon_under_a_permissive_umask_keeps_state_dir_0700_and_its_files_0600(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # made by hand, or by an older relayd
    port = free_port()
    config = write_daemon_config(
        tmp_path / "relayd.yaml", emulator, receiver, state_dir=state, admin_port=port
    )
    daemon = Daemon(config, port)
    previous = os.umask(0o022)  # the usual umask, inherited by the child
    try:
        await daemon.start()
    finally:
        os.umask(previous)
    try:
        await wait_until(lambda: emulator.connected("me") == 1, timeout=30, what="connected")
        await emulator.emit("me")
        await wait_until(lambda: len(receiver.delivered("hook")) == 1, what="delivered")
        files = sorted(path.name for path in state.iterdir())
        assert {"outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm"} <= set(files)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in files:
            mode = stat.S_IMODE((state / name).stat().st_mode)
            assert mode == 0o600, f"{name} is {mode:o}"
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.stop()
