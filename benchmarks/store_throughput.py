"""One relay on PostgreSQL against one on SQLite, in the same run: what the shared store costs.

    python benchmarks/store_throughput.py [--burst 3000] [--rounds 3] [--paced-rate 200] [--json]

The Graph emulator and the webhook receiver run here; each relay (`python -m relayd run`, signing
on, the same webhook concurrency) runs in its own child process, one after the other, on the same
bursts and paced stream as benchmarks/throughput.py (whose Bench measures them). The PostgreSQL
server is this run's own (tests/support/postgres.py: Debian's package, a temporary data directory,
fsync and synchronous_commit on as in production), on this machine: a database across a network
adds its round trip to every commit. Its CPU shows in "other CPU %".

The figures that matter are the ratios (postgresql/sqlite), not the rates: both share the machine
with the harness and whatever else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from benchkit import (
    TOKEN,
    Child,
    Drive,
    PathCounter,
    machine,
    machine_line,
    new_secret,
    print_json,
    raise_nofile,
    relay_command,
    rounded,
    table,
    write_config,
)
from throughput import Bench, PipelineResult, run_child

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.postgres import running_server

from relayd.emulator import GraphEmulator, WebhookReceiver

STORES = ("sqlite", "postgresql")


def relay_child(
    store: str, bench: Bench, receiver: WebhookReceiver, workdir: Path, secret: str, url: str
) -> tuple[Child, str]:
    resource = f"drives/bench-{store}"
    config = write_config(
        workdir / store,
        graph_url=bench.emulator.base_url,
        webhooks={"bench": receiver.url(store)},
        drives=[Drive(name="bench", resource=resource, webhook="bench")],
        secret=secret,
        concurrency=bench.args.concurrency,
    )
    if store == "postgresql":
        document = yaml.safe_load(config.read_text())
        document["store"] = {"url": url}
        config.write_text(yaml.safe_dump(document, sort_keys=False))
    return Child(relay_command(config), workdir / store / "stderr.log"), resource


async def run_relay(
    store: str, bench: Bench, receiver: WebhookReceiver, workdir: Path, secret: str, url: str
) -> PipelineResult:
    child, resource = relay_child(store, bench, receiver, workdir, secret, url)
    return await run_child(store, bench, child, resource)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(4096)
    secret = new_secret()
    counter = PathCounter()
    results: list[PipelineResult] = []
    with running_server() as server:
        url = server.create_database("relayd_bench")
        with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
            async with (
                GraphEmulator(tokens=[TOKEN]) as emulator,
                WebhookReceiver(on_request=counter.on_request) as receiver,
            ):
                bench = Bench(emulator, counter, args)
                for store in STORES:
                    results.append(await run_relay(store, bench, receiver, Path(tmp), secret, url))
    return report(args, results)


def report(args: argparse.Namespace, results: list[PipelineResult]) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    sqlite, postgresql = by_name["sqlite"].burst, by_name["postgresql"].burst
    paced = {name: r.paced.as_json() if r.paced else None for name, r in by_name.items()}
    return {
        "benchmark": "store_throughput",
        "machine": machine(),
        "settings": {
            "burst": args.burst,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "paced_rate": args.paced_rate,
            "paced_seconds": args.paced_seconds,
            "concurrency": args.concurrency,
        },
        "stores": {
            r.name: {
                "complete": r.complete,
                "burst": r.burst.as_json(),
                "burst_rates": [rounded(b.rate, 1) for b in r.bursts],
                "paced": paced[r.name],
            }
            for r in results
        },
        "ratios": {
            # > 1: PostgreSQL relays faster; < 1: slower.
            "burst_throughput_postgresql/sqlite": rounded(postgresql.rate / sqlite.rate),
            # The relay's own CPU per notification, PostgreSQL's over SQLite's.
            "relay_cpu_per_notification_postgresql/sqlite": rounded(
                postgresql.child_cpu_us_per_notification / sqlite.child_cpu_us_per_notification
            ),
        },
        "ok": all(r.complete for r in results),
    }


def render(document: dict[str, Any]) -> str:
    settings = document["settings"]
    rows = []
    for name, result in document["stores"].items():
        burst, paced = result["burst"], result["paced"]
        rows.append(
            [
                name,
                burst["rate"],
                " ".join(f"{r:,.0f}" for r in result["burst_rates"]),
                burst["p50_ms"],
                burst["child_cpu_us_per_notification"],
                burst["other_cpu_pct"],
                paced["p50_ms"] if paced else "-",
                paced["p99_ms"] if paced else "-",
                f"{burst['delivered']}/{burst['emitted']}",
            ]
        )
    lines = [
        f"machine: {machine_line(document['machine'])}",
        f"burst N={settings['burst']} x {settings['rounds']} rounds (median shown), paced"
        f" {settings['paced_rate']:g}/s for {settings['paced_seconds']:g}s, webhook concurrency"
        f" {settings['concurrency']}; one relay per store, signing on",
        table(
            [
                "store",
                "notif/s",
                "rounds",
                "p50 ms",
                "relay CPU us/notif",
                "other CPU %",
                "paced p50 ms",
                "paced p99 ms",
                "delivered",
            ],
            rows,
        ),
    ]
    for key, value in document["ratios"].items():
        lines.append(f"{key}: {value:.2f}")
    lines.append("all delivered: " + ("yes" if document["ok"] else "NO"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--paced-rate", type=float, default=200.0)
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--quiet-wait", type=float, default=0.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    document = asyncio.run(run(args))
    if args.json:
        print_json(document)
    else:
        print(render(document))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
