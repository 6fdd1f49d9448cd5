"""A first sync in `mode: changes`: does memory stay flat however big the drive is?

Runs relayd (a subprocess, durable outbox) against the in-process Graph emulator twice in one run:
a small drive (the baseline) and a large one (100,000 items by default), each with
`initial_sync: true`, and reports the relay's peak RSS for both, their ratio, and items/s until
the receiver has every item.

    python benchmarks/delta_sync.py [--items 100000] [--baseline 1000] [--page 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ReceivedRequest

TOKEN = "bench-token"
DEADLINE = 600.0


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the process's peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


async def sync_once(items: int, page: int) -> dict[str, float]:
    received = 0

    def count(request: ReceivedRequest) -> None:
        nonlocal received
        received += len(json.loads(request.body)["data"]["items"])

    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as scratch:
        folder = Path(scratch)
        async with (
            GraphEmulator(tokens=[TOKEN]) as graph,
            WebhookReceiver(on_request=count) as receiver,
        ):
            graph.delta_page_size = page
            graph.change_log("me").change(items)
            (folder / "token").write_text(TOKEN)
            config = {
                # The emulator is no tenant to protect: a budget far above what the run asks for, so
                # the figures measure relayd, not graph.requests_per_minute (docs/throttling.md).
                "graph": {"base_url": graph.base_url, "requests_per_minute": 1_000_000},
                "state_dir": "state",
                "admin": {"listen": ""},
                "log": {"level": "warning"},
                "accounts": {"bench": {"token_file": "token"}},
                "webhooks": {"hook": {"url": receiver.url("hook"), "concurrency": 16}},
                "drives": [
                    {
                        "name": "big",
                        "account": "bench",
                        "resource": "me",
                        "webhook": "hook",
                        "mode": "changes",
                        "changes": {"initial_sync": True, "max_items": page},
                    }
                ],
            }
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relayd",
                "run",
                "--config",
                str(folder / "config.yaml"),
                stdin=asyncio.subprocess.DEVNULL,
            )
            try:
                while received < items:
                    if time.monotonic() - started > DEADLINE:
                        raise TimeoutError(f"{received}/{items} items after {DEADLINE:g}s")
                    if process.returncode is not None:
                        raise RuntimeError(f"relayd exited {process.returncode}")
                    await asyncio.sleep(0.05)
                elapsed = time.monotonic() - started
                peak = peak_rss_kib(process.pid)
            finally:
                if process.returncode is None:
                    process.terminate()
                    await asyncio.wait_for(process.wait(), 30)
    return {
        "items": items,
        "seconds": elapsed,
        "items_per_s": items / elapsed,
        "peak_rss_mib": peak / 1024,
    }


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--page", type=int, default=200, help="items per delta page and body")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    small = await sync_once(args.baseline, args.page)
    large = await sync_once(args.items, args.page)
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    if args.json:
        print(json.dumps({"baseline": small, "large": large, "rss_ratio": ratio}))
        return 0
    print(f"{'first sync':<12} {'items':>8} {'seconds':>8} {'items/s':>9} {'peak RSS':>10}")
    for name, run in (("baseline", small), ("large", large)):
        print(
            f"{name:<12} {run['items']:>8.0f} {run['seconds']:>8.1f} {run['items_per_s']:>9.0f}"
            f" {run['peak_rss_mib']:>8.1f}MiB"
        )
    print(f"peak RSS, large / baseline: {ratio:.2f} (pid {os.getpid()} ran both)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
