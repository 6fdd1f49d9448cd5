"""Throughput on SQLite and PostgreSQL, one replica against three, and failover after kill -9.

    python benchmarks/cluster.py [--drives 30] [--burst 3000] [--rounds 3] [--lease 5] [--json]

In one run, against one Graph emulator and one webhook receiver (both in this process) and a
PostgreSQL server of its own (Debian's package, as the tests start it):

  sqlite     one `relayd run`, the SQLite store in its state_dir (the default)
  pg-1       one `relayd run` on PostgreSQL, as a cluster of one
  pg-3       three `relayd run` replicas on one database, the drives spread over them
  failover   pg-3's replicas again: one is killed with SIGKILL; the time until each of its
             drives has a socket from another replica (and every drive has exactly one)

Each setup first waits until its drives have settled (one socket each, no connect for `--lease`
seconds). Throughput = burst / (last delivery - first emit): `--burst` notifications emitted over
all the drives as fast as the emulator can, `--rounds` times per setup (the median is reported); the
ratios are against sqlite in the same run. Every notification must arrive (at least once: a
replica that dies may deliver a row twice, which receivers dedupe on webhook-id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchkit import (
    TOKEN,
    Child,
    Drive,
    PathCounter,
    machine,
    machine_line,
    new_secret,
    print_json,
    relay_command,
    rounded,
    table,
    wait_until,
    write_config,
)
from support.postgres import PostgresServer

from relayd.emulator import GraphEmulator, WebhookReceiver


def config_for(
    folder: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    drives: list[Drive],
    *,
    url: str | None,
    replica: str | None,
    lease: float,
) -> Path:
    path = write_config(
        folder,
        graph_url=emulator.base_url,
        webhooks={"hook": receiver.url("hook")},
        drives=drives,
        secret=new_secret(),
        concurrency=8,
        log_level="warning",
    )
    document = yaml.safe_load(path.read_text())
    if url is not None:
        document["store"] = {"url": url}
    if replica is not None:
        document["cluster"] = {"replica": replica, "lease": f"{lease}s"}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def all_connected(emulator: GraphEmulator, drives: list[Drive]) -> bool:
    return all(emulator.connected(d.resource) == 1 for d in drives)


async def settle(emulator: GraphEmulator, drives: list[Drive], *, quiet: float, what: str) -> None:
    """Until every drive has one socket and none has (re)connected for `quiet` seconds: replicas
    that start one after the other hand drives over as each joins, and a notification sent to a
    drive between two holders reaches nobody (the new holder sends drive.resync instead)."""
    deadline = time.monotonic() + 120
    last = (-1, time.monotonic())
    while time.monotonic() < deadline:
        connects = sum(emulator.connects[d.resource] for d in drives)
        if connects != last[0] or not all_connected(emulator, drives):
            last = (connects, time.monotonic())
        elif time.monotonic() - last[1] >= quiet:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what}: the drives did not settle on their replicas")


async def burst(
    emulator: GraphEmulator,
    counter: PathCounter,
    drives: list[Drive],
    size: int,
    children: list[Child],
) -> dict[str, Any]:
    """Emit `size` notifications round-robin over the drives; wait for every one to arrive."""
    before = counter.count("hook")
    per_drive, extra = divmod(size, len(drives))
    started = time.monotonic()
    for index, drive in enumerate(drives):
        count = per_drive + (1 if index < extra else 0)
        if count:
            await emulator.emit(drive.resource, count)
    emitted_in = time.monotonic() - started
    arrived = await counter.wait("hook", before + size, timeout=120, alive=None)
    for child in children:
        child.check_alive("a replica")
    last = counter.arrivals["hook"][-1][0] if counter.arrivals.get("hook") else started
    seconds = max(1e-9, last - started)
    return {
        "complete": arrived,
        "delivered": counter.count("hook") - before,
        "emit_seconds": rounded(emitted_in),
        "seconds": rounded(seconds),
        "per_second": rounded(size / seconds, 1),
    }


async def run_setup(
    name: str,
    root: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    counter: PathCounter,
    drives: list[Drive],
    *,
    url: str | None,
    replicas: int,
    args: argparse.Namespace,
    failover: bool = False,
) -> dict[str, Any]:
    names = [f"{name}-r{i}" for i in range(replicas)]
    children = []
    for replica in names:
        config = config_for(
            root / name / replica,
            emulator,
            receiver,
            drives,
            url=url,
            replica=None if url is None else replica,
            lease=args.lease,
        )
        children.append(Child(relay_command(config), root / name / replica / "relayd.log"))
    try:
        for child in children:
            await child.start()
        await settle(emulator, drives, quiet=args.lease, what=name)
        await burst(emulator, counter, drives, min(200, args.burst), children)  # warm-up
        rounds = [
            await burst(emulator, counter, drives, args.burst, children) for _ in range(args.rounds)
        ]
        result: dict[str, Any] = {
            "replicas": replicas,
            "rounds": rounds,
            "complete": all(r["complete"] for r in rounds),
            "per_second": rounded(statistics.median(r["per_second"] for r in rounds), 1),
        }
        if failover:
            result["failover"] = await measure_failover(emulator, drives, children)
        return result
    finally:
        for child in children:
            await child.stop()


async def measure_failover(
    emulator: GraphEmulator, drives: list[Drive], children: list[Child]
) -> dict[str, Any]:
    """SIGKILL the first replica; time until every drive has one socket again."""
    victim = children[0]
    await victim.kill()
    killed = time.monotonic()
    orphaned = await wait_until(
        lambda: not all_connected(emulator, drives), timeout=10, what="the victim's sockets close"
    )
    back = await wait_until(
        lambda: all_connected(emulator, drives), timeout=120, what="every drive reconnected"
    )
    peak = max(emulator.peak_connected[d.resource] for d in drives)
    return {
        "sockets_closed_after": rounded(orphaned - killed),
        "seconds": rounded(back - killed),
        "peak_sockets_per_drive": peak,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    server = PostgresServer()
    root = Path(tempfile.mkdtemp(prefix="relayd-bench-cluster-"))
    try:
        server.init()
        server.start()
        counter = PathCounter()
        async with (
            GraphEmulator(tokens=[TOKEN]) as emulator,
            WebhookReceiver(on_request=counter.on_request) as receiver,
        ):
            drives = [
                Drive(f"d{i:03d}", f"drives/bench{i:03d}", "hook") for i in range(args.drives)
            ]
            setups: dict[str, Any] = {}
            for name in args.setups.split(","):
                replicas = {"sqlite": 1, "pg-1": 1, "pg-3": 3}[name]
                url = None if name == "sqlite" else server.create_database(name.replace("-", "_"))
                setups[name] = await run_setup(
                    name, root, emulator, receiver, counter, drives,
                    url=url, replicas=replicas, args=args, failover=name == "pg-3",
                )  # fmt: skip
        base = setups.get("sqlite", {}).get("per_second") or 1.0
        for result in setups.values():
            result["ratio_to_sqlite"] = rounded((result["per_second"] or 0.0) / base)
        return {
            "ok": all(s["complete"] for s in setups.values()),
            "machine": machine(),
            "settings": {
                "drives": args.drives,
                "burst": args.burst,
                "rounds": args.rounds,
                "lease": args.lease,
            },
            "setups": setups,
        }
    finally:
        server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drives", type=int, default=30)
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lease", type=float, default=5.0, help="cluster.lease, seconds")
    parser.add_argument("--setups", default="sqlite,pg-1,pg-3", help="which, comma-separated")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of tables")
    args = parser.parse_args()
    document = asyncio.run(main_async(args))
    if args.json:
        print_json(document)
    else:
        print(machine_line(document["machine"]))
        rows = [
            [name, s["replicas"], s["per_second"], s["ratio_to_sqlite"], s["complete"]]
            for name, s in document["setups"].items()
        ]
        print(table(["setup", "replicas", "notifications/s", "vs sqlite", "complete"], rows))
        failover = document["setups"].get("pg-3", {}).get("failover")
        if failover is not None:
            print(
                f"failover after kill -9 (lease {args.lease:g}s): every drive connected again "
                f"after {failover['seconds']}s; at most {failover['peak_sockets_per_drive']} "
                "socket per drive"
            )
        print(json.dumps(document["settings"]))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
