"""Several `relayd run` processes as one cluster: one emulator, one receiver, one database.

Each replica is a real subprocess with its own folder (config, state_dir, log) and admin port;
they share the PostgreSQL database given (directly, or through a proxy per replica).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from support.daemon import Daemon, free_port, write_daemon_config

from relayd.emulator import GraphEmulator, WebhookReceiver

LEASE = 4.0


def drives(count: int, *, mode: str = "notifications") -> list[dict[str, Any]]:
    """`count` drives d00.. on resources drives/d00.. (no lookup needed)."""
    made = []
    for i in range(count):
        drive: dict[str, Any] = {
            "name": f"d{i:02d}",
            "account": "test",
            "resource": f"drives/d{i:02d}",
            "webhook": "hook",
        }
        if mode == "changes":
            drive["mode"] = "changes"
            drive["changes"] = {"quiet_period": 0, "follow_up": 0, "poll_interval": 0}
        made.append(drive)
    return made


class Replicas:
    def __init__(
        self,
        root: Path,
        emulator: GraphEmulator,
        receiver: WebhookReceiver,
        url: str,
        drive_list: list[dict[str, Any]],
        webhooks: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.root = root
        self.emulator = emulator
        self.receiver = receiver
        self.url = url
        self.drives = drive_list
        self.webhooks = webhooks
        self.daemons: dict[str, Daemon] = {}

    def resources(self) -> list[str]:
        return [drive["resource"] for drive in self.drives]

    async def start(self, name: str, *, url: str | None = None) -> Daemon:
        folder = self.root / name
        folder.mkdir(parents=True)
        port = free_port()
        config = write_daemon_config(
            folder / "relayd.yaml",
            self.emulator,
            self.receiver,
            state_dir=folder / "state",
            admin_port=port,
            drives=self.drives,
            webhooks=self.webhooks,
            store={"url": url or self.url},
            cluster={"replica": name, "lease": f"{LEASE}s"},
        )
        daemon = Daemon(config, port)
        await daemon.start()
        self.daemons[name] = daemon
        return daemon

    async def start_all(self, names: Iterable[str]) -> None:
        await asyncio.gather(*(self.start(name) for name in names))

    async def held(self) -> dict[str, str]:
        """drive name -> the replica holding it, from every replica's own /status."""
        holding: dict[str, str] = {}
        for name, daemon in self.daemons.items():
            if daemon.process is None or daemon.process.returncode is not None:
                continue
            status = await daemon.status()
            for resource in status.get("cluster", {}).get("held", []):
                kind, _, drive = resource.partition(":")
                if kind == "drive":
                    holding[drive] = name
        return holding

    def all_connected_once(self) -> bool:
        """Every drive has exactly one socket at the emulator."""
        return all(self.emulator.connected(r) == 1 for r in self.resources())

    def peak(self) -> int:
        """The most sockets any drive ever had at once."""
        return max(self.emulator.peak_connected[r] for r in self.resources())

    async def close(self) -> None:
        await asyncio.gather(*(daemon.stop() for daemon in self.daemons.values()))
