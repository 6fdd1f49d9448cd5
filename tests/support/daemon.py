"""The real daemon for fault tests: `relayd run` in a subprocess, its admin server, its outbox file.

The config is written the way a user writes one (YAML on disk), the log goes to a file the test
reads, and the admin endpoints are asked over loopback, as an operator or a probe would.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from relayd.emulator import GraphEmulator, WebhookReceiver
from support.configs import relay_document


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_daemon_config(
    path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    *,
    state_dir: Path,
    admin_port: int,
    **top: Any,
) -> Path:
    """A config file for a subprocess daemon: JSON logs at debug, admin on `admin_port`."""
    document = relay_document(path.parent, emulator, receiver, **top)
    document["state_dir"] = str(state_dir)
    document["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    document["log"] = {"level": "debug", "format": "json"}
    path.write_text(yaml.safe_dump(document))
    return path


class Daemon:
    """`relayd run --config PATH` as a child process; `wrap` runs it elsewhere (a namespace)."""

    def __init__(
        self,
        config: Path,
        admin_port: int,
        *,
        wrap: Callable[[list[str]], list[str]] = list,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env`: the child's whole environment (None: this process's)."""
        self.env = None if env is None else dict(env)
        self.config = config
        self.admin_port = admin_port
        self.log = config.parent / "relayd.log"
        self._wrap = wrap
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        argv = self._wrap([sys.executable, "-m", "relayd", "run", "--config", str(self.config)])
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
            )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def get(self, path: str) -> tuple[int, str]:
        """GET an admin endpoint; (0, error) while the daemon does not answer yet."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status, await response.text()
        except aiohttp.ClientError as exc:
            return 0, str(exc)

    async def status(self) -> dict[str, Any]:
        code, text = await self.get("/status")
        return json.loads(text) if code == 200 else {}

    async def metric(self, name: str) -> float:
        """The sum of a metric's samples in /metrics (0 when absent)."""
        _, text = await self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def events(self, event: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines whose event (message) contains `event`."""
        if not self.log.exists():
            return []
        found = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and event in str(record.get("event", "")):
                found.append(record)
        return found


def outbox_rows(state_dir: Path) -> dict[str, int]:
    """Rows per state in the daemon's outbox, read as `relayd outbox status` would."""
    path = state_dir / "outbox.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
