"""Many drives in one relay: start-up time, memory per drive, idle CPU, Graph request rate.

    python benchmarks/many_drives.py [--sizes 1000,5000] [--idle-seconds 30] [--tls] [--json]

For each size N, a fresh Graph emulator in this process (realistic ping interval: 25 s, timeout
20 s) and one `python -m relayd run` child watching drives/d0001 ... drives/dNNNN, all relayed to
one webhook (SQLite outbox, signing on):

* time from spawning the relay until every drive has connected (the emulator's `connects`
  counter has every drive), and from the first Graph request until then;
* the Graph endpoint request rate during start-up (the emulator's `endpoint_requests`, sampled
  every 0.1 s): mean, and the busiest one-second window;
* RSS (VmRSS from /proc/PID/status) once settled, against a relay with 0 drives -> KiB per drive;
  VmHWM (the peak) too;
* CPU % of one core while idle (pings only), from /proc/PID/stat utime+stime over
  `--idle-seconds` (default 30, so every socket's 25 s ping falls inside the window at least once);
* time from SIGTERM until the relay has exited.

With `--tls` the emulator serves https and wss with a certificate from a throwaway CA (trustme)
that the relay trusts through `tls.ca_file`, as production runs: every socket is a TLS session.

Both processes need two descriptors or so per drive (the websocket, and a pooled HTTP connection
while start-up lasts); the soft RLIMIT_NOFILE is raised to fit (children inherit it).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchkit import (
    LOOPS,
    TOKEN,
    Child,
    Drive,
    cpu_seconds,
    loop_env,
    loop_name,
    machine,
    machine_line,
    new_secret,
    own_cpu_seconds,
    print_json,
    raise_nofile,
    relay_command,
    rounded,
    rss_kib,
    system_busy_seconds,
    table,
    write_config,
)

from relayd.emulator import GraphEmulator
from relayd.emulator.tls import ThrowawayCA, throwaway_ca

SAMPLE_EVERY = 0.1


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def live_sockets(emulator: GraphEmulator) -> int:
    """Sockets connected now. The emulator has no public total (connected() is per drive and
    scans every socket), so this reads its socket table, if it still has one; -1 otherwise."""
    conns = getattr(emulator, "_conns", None)
    return len(conns) if isinstance(conns, dict) else -1


@dataclass
class Idle:
    seconds: float
    relay_cpu_pct: float
    harness_cpu_pct: float
    other_cpu_pct: float
    new_connects: int  # reconnections during the idle window: should be 0


async def measure_idle(child: Child, emulator: GraphEmulator, seconds: float) -> Idle:
    connects = sum(emulator.connects.values())
    busy, own, relay = system_busy_seconds(), own_cpu_seconds(), cpu_seconds(child.pid)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    child.check_alive("the relay")
    wall = time.monotonic() - started
    relay = cpu_seconds(child.pid) - relay
    own = own_cpu_seconds() - own
    other = max(0.0, system_busy_seconds() - busy - relay - own)
    return Idle(
        seconds=wall,
        relay_cpu_pct=relay / wall * 100,
        harness_cpu_pct=own / wall * 100,
        other_cpu_pct=other / wall * 100,
        new_connects=sum(emulator.connects.values()) - connects,
    )


@dataclass
class Baseline:
    rss_kib: int
    idle: Idle


@dataclass(frozen=True)
class Tls:
    """The throwaway CA of a --tls run and its certificate file (tls.ca_file)."""

    authority: ThrowawayCA
    ca_file: Path


def emulator_for(tls: Tls | None) -> GraphEmulator:
    return GraphEmulator(
        tokens=[TOKEN], ssl_context=tls.authority.server_context if tls is not None else None
    )


async def baseline(args: argparse.Namespace, workdir: Path, tls: Tls | None) -> Baseline:
    """A relay with no drives: what the process costs before the first drive (with the same
    TLS setting, so KiB per drive counts the drives only)."""
    async with emulator_for(tls) as emulator:
        config = write_config(
            workdir / "d0",
            graph_url=emulator.base_url,
            webhooks={"bench": "http://127.0.0.1:9/hook"},  # never called: nothing to deliver
            drives=[],
            secret=new_secret(),
            concurrency=8,
            ca_file=tls.ca_file if tls is not None else None,
        )
        argv = relay_command(config, extra=args.runner)
        async with Child(argv, workdir / "d0" / "stderr.log", env=loop_env(args.loop)) as child:
            await asyncio.sleep(args.settle)
            child.check_alive("the relay with 0 drives")
            rss = rss_kib(child.pid)
            idle = await measure_idle(child, emulator, args.idle_seconds)
    return Baseline(rss_kib=rss, idle=idle)


@dataclass
class SizeResult:
    drives: int
    all_connected: bool
    connected_s: float  # spawn -> every drive connected
    connected_after_first_request_s: float
    endpoint_requests: int
    graph_rate_mean: float  # endpoint requests per second, first request -> last
    graph_rate_peak_1s: float
    reconnects: int  # connects beyond the first per drive, during start-up
    startup_relay_cpu_s: float
    startup_harness_cpu_s: float
    rss_kib: int
    hwm_kib: int
    kib_per_drive: float
    live_sockets: int
    idle: Idle
    stop_s: float
    exit_code: int | None


def request_rates(samples: list[tuple[float, int]]) -> tuple[float, float, float]:
    """(first request time, mean rate, busiest 1 s window) from (time, total requests) samples."""
    active = [(t, n) for t, n in samples if n > 0]
    if not active:
        return math.nan, math.nan, math.nan
    first_t = active[0][0]
    last_t, total = next((t, n) for t, n in active if n == active[-1][1])
    prior = [n for t, n in samples if t < first_t]
    start_n = prior[-1] if prior else 0
    mean = (total - start_n) / max(last_t - first_t, SAMPLE_EVERY)
    peak = 0.0
    j = 0
    for i, (t, n) in enumerate(samples):
        while j < i and samples[j][0] < t - 1.0:
            j += 1
        span = t - samples[j][0]
        if span >= 0.5:
            peak = max(peak, (n - samples[j][1]) / span)
    return first_t, mean, peak


async def start_up(
    child: Child, emulator: GraphEmulator, count: int, timeout: float
) -> tuple[float, list[tuple[float, int]], float, float]:
    """Sample until every drive has connected; (seen at, samples, relay CPU s, harness CPU s)."""
    samples: list[tuple[float, int]] = []
    own = own_cpu_seconds()
    deadline = child.started_at + timeout
    seen = math.nan
    while time.monotonic() < deadline:
        now = time.monotonic()
        samples.append((now, sum(emulator.endpoint_requests.values())))
        if len(emulator.connects) >= count:
            seen = now
            break
        child.check_alive("the relay")
        await asyncio.sleep(SAMPLE_EVERY)
    return seen, samples, cpu_seconds(child.pid), own_cpu_seconds() - own


def idle_drives_config(folder: Path, graph_url: str, count: int, tls: Tls | None) -> Path:
    """A relay config for `count` drives against the emulator at `graph_url`, their webhook a
    port nobody answers (idle drives post nothing)."""
    drives = [Drive(f"d{i:04d}", f"drives/d{i:04d}", "bench") for i in range(1, count + 1)]
    return write_config(
        folder,
        graph_url=graph_url,
        webhooks={"bench": "http://127.0.0.1:9/hook"},
        drives=drives,
        secret=new_secret(),
        concurrency=8,
        ca_file=tls.ca_file if tls is not None else None,
    )


async def one_size(
    args: argparse.Namespace, workdir: Path, count: int, base: Baseline, tls: Tls | None
) -> SizeResult:
    folder = workdir / f"d{count}"
    async with emulator_for(tls) as emulator:
        config = idle_drives_config(folder, emulator.base_url, count, tls)
        timeout = 120.0 + count * 0.1
        argv = relay_command(config, extra=args.runner)
        child = Child(argv, folder / "stderr.log", stop_timeout=120.0, env=loop_env(args.loop))
        async with child:
            seen, samples, relay_cpu, harness_cpu = await start_up(child, emulator, count, timeout)
            first_request, mean, peak = request_rates(samples)
            reconnects = sum(emulator.connects.values()) - len(emulator.connects)
            requests = sum(emulator.endpoint_requests.values())
            await asyncio.sleep(args.settle)
            rss, hwm = rss_kib(child.pid), vm_hwm_kib(child.pid)
            idle = await measure_idle(child, emulator, args.idle_seconds)
            live = live_sockets(emulator)
            stopping = time.monotonic()
            code = await child.stop()
            # Timed from a thread: this loop, serving every socket's emulator side, hears of
            # the exit late at thousands of drives (by over a minute at 10,000 over TLS).
            stop_s = child.stop_seconds or (time.monotonic() - stopping)
    return SizeResult(
        drives=count,
        all_connected=not math.isnan(seen),
        connected_s=seen - child.started_at,
        connected_after_first_request_s=seen - first_request,
        endpoint_requests=requests,
        graph_rate_mean=mean,
        graph_rate_peak_1s=peak,
        reconnects=reconnects,
        startup_relay_cpu_s=relay_cpu,
        startup_harness_cpu_s=harness_cpu,
        rss_kib=rss,
        hwm_kib=hwm,
        kib_per_drive=(rss - base.rss_kib) / count,
        live_sockets=live,
        idle=idle,
        stop_s=stop_s,
        exit_code=code,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_nofile(4 * max(args.sizes) + 1024)
    with tempfile.TemporaryDirectory(prefix="relayd-drives-") as tmp:
        workdir = Path(tmp)
        tls = None
        if args.tls:
            authority = throwaway_ca()
            tls = Tls(authority, authority.write_ca(workdir / "test-ca.pem"))
        base = await baseline(args, workdir, tls)
        results = [await one_size(args, workdir, count, base, tls) for count in args.sizes]
        if args.keep_logs is not None:
            keep_logs(workdir, args.keep_logs)
    return {
        "benchmark": "many_drives",
        "machine": machine(),
        "settings": {
            "sizes": args.sizes,
            "idle_seconds": args.idle_seconds,
            "settle_seconds": args.settle,
            "ping_interval": 25,
            "ping_timeout": 20,
            "nofile_soft_limit": limit,
            "runner": args.runner,
            "tls": args.tls,
            "loop": loop_name(args.loop),
        },
        "baseline": {"rss_kib": base.rss_kib, "idle": _json(asdict(base.idle))},
        "sizes": [_json(asdict(r)) for r in results],
        "ok": all(r.all_connected for r in results),
    }


def keep_logs(workdir: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*/stderr.log"):
        shutil.copyfile(log, destination / f"{log.parent.name}.log")


def _json(document: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_json(v) if isinstance(v, dict) else rounded(v, 2) if isinstance(v, float) else v)
        for k, v in document.items()
    }


def render(document: dict[str, Any]) -> str:
    base = document["baseline"]
    settings = document["settings"]
    rows = []
    for r in document["sizes"]:
        rows.append(
            [
                r["drives"],
                r["connected_s"],
                r["connected_after_first_request_s"],
                r["graph_rate_mean"],
                r["graph_rate_peak_1s"],
                r["reconnects"],
                r["startup_relay_cpu_s"],
                r["rss_kib"] // 1024,
                r["hwm_kib"] // 1024,
                r["kib_per_drive"],
                r["idle"]["relay_cpu_pct"],
                r["idle"]["harness_cpu_pct"],
                r["idle"]["other_cpu_pct"],
                r["stop_s"],
            ]
        )
    return "\n".join(
        [
            f"machine: {machine_line(document['machine'])}",
            f"emulator pings every {settings['ping_interval']} s; idle measured over"
            f" {settings['idle_seconds']:g} s after {settings['settle_seconds']:g} s settling;"
            f" RLIMIT_NOFILE soft {settings['nofile_soft_limit']};"
            + (" https/wss (test CA)" if settings.get("tls") else " plain http/ws")
            + f"; event loop {settings.get('loop', '?')}",
            f"relay with 0 drives: RSS {base['rss_kib'] / 1024:.1f} MiB,"
            f" idle CPU {base['idle']['relay_cpu_pct']:.2f} % of one core",
            "",
            table(
                [
                    "drives",
                    "all up s",
                    "after 1st req s",
                    "Graph req/s",
                    "peak 1s",
                    "reconnects",
                    "start CPU s",
                    "RSS MiB",
                    "peak MiB",
                    "KiB/drive",
                    "idle CPU %",
                    "emulator idle %",
                    "other %",
                    "stop s",
                ],
                rows,
            ),
            "",
            "all drives connected: " + ("yes" if document["ok"] else "NO"),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000", help="comma-separated drive counts")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle CPU window")
    parser.add_argument("--settle", type=float, default=5.0, help="wait before RSS and idle")
    parser.add_argument(
        "--runner",
        action="append",
        default=[],
        metavar="ARG",
        help="run the relay through benchmarks/relay_runner.py with this option (repeatable),"
        " e.g. --runner=--gc-freeze=40",
    )
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="copy the relays' stderr logs to this folder"
    )
    parser.add_argument(
        "--tls", action="store_true", help="emulator over https/wss, trusted via tls.ca_file"
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="default",
        help="the relay's event loop (default: the daemon's own choice, uvloop where installed)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not args.sizes or min(args.sizes) < 1 or max(args.sizes) > 20_000:
        parser.error("--sizes: drive counts from 1 to 20000")
    document = asyncio.run(run(args))
    if args.json:
        print_json(document)
    else:
        print(render(document))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
