"""Throughput and latency of the relay against the bare minimum, on one emulator and one receiver.

    python benchmarks/throughput.py [--burst 5000] [--paced-rate 200] [--paced-seconds 5] [--json]

The Graph emulator and the webhook receiver run here, in this process; each pipeline runs in its
own child process, so it never shares an event loop (or a core's worth of GIL) with them:

  relay         `python -m relayd run`: durable SQLite outbox, Standard Webhooks signing on
  relay-memory  the same relay with the store bypassed (benchmarks/memory_outbox.py), signing on
  bare          benchmarks/bare_pipeline.py: socket in, POST out, nothing stored or signed
  *-asyncio     (optional) the same on asyncio's own event loop; the others run on the
                daemon's choice, uvloop where installed (relayd.eventloop)

All POST with the same number of requests in flight (`--concurrency`, default 8: relayd's default
webhook `concurrency`; bare runs that many POST workers on one aiohttp session).

For each pipeline, one after the other: a warm-up, `--rounds` bursts (N notifications emitted as
fast as the emulator can; throughput = N / (last received - first emitted)), then a paced stream
(`--paced-rate` per second for `--paced-seconds`; latency = receiver arrival - emit, both
`time.monotonic()` in this process). Child CPU is read from /proc/PID/stat.

Before that, the harness's own ceilings: the emulator pushing to a consumer that only counts
(emit rate), and a POST load on the receiver (receive rate). A pipeline that comes close to either
is measuring the harness, not itself.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchkit import (
    HERE,
    TOKEN,
    Child,
    Drive,
    PathCounter,
    cpu_seconds,
    loop_env,
    machine,
    machine_line,
    new_secret,
    notification_seq,
    own_cpu_seconds,
    percentile,
    print_json,
    raise_nofile,
    relay_command,
    rounded,
    system_busy_seconds,
    table,
    wait_for_quiet,
    wait_until,
    write_config,
)

from relayd.emulator import GraphEmulator, WebhookReceiver

# Every pipeline runs on the daemon's own choice of event loop (uvloop where installed, see
# relayd.eventloop; bare_pipeline.py picks the same way); the -asyncio ones on asyncio's own.
PIPELINES = (
    "relay",
    "relay-memory",
    "bare",
    "relay-asyncio",
    "relay-memory-asyncio",
    "bare-asyncio",
)
DEFAULT_PIPELINES = "relay,relay-memory,bare"
YIELD_EVERY = 32  # emits between yields to the event loop during a burst
CONNECT_TIMEOUT = 30.0


@dataclass
class PhaseResult:
    """One burst or paced stream of one pipeline."""

    emitted: int
    delivered: int  # distinct notifications of this phase that arrived
    duplicates: int
    seconds: float  # first emit -> last arrival
    emit_seconds: float  # first emit -> last emit
    rate: float  # delivered / seconds
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    child_cpu_s: float
    harness_cpu_s: float
    other_cpu_s: float  # everything else on the machine meanwhile: noise

    @property
    def child_cpu_us_per_notification(self) -> float:
        return self.child_cpu_s / self.emitted * 1e6 if self.emitted else math.nan

    @property
    def child_cpu_pct(self) -> float:
        return self.child_cpu_s / self.seconds * 100 if self.seconds > 0 else math.nan

    @property
    def harness_cpu_pct(self) -> float:
        return self.harness_cpu_s / self.seconds * 100 if self.seconds > 0 else math.nan

    @property
    def other_cpu_pct(self) -> float:
        return self.other_cpu_s / self.seconds * 100 if self.seconds > 0 else math.nan

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            k: (rounded(v) if isinstance(v, float) else v) for k, v in asdict(self).items()
        }
        document["child_cpu_us_per_notification"] = rounded(self.child_cpu_us_per_notification, 1)
        document["child_cpu_pct"] = rounded(self.child_cpu_pct, 1)
        document["harness_cpu_pct"] = rounded(self.harness_cpu_pct, 1)
        document["other_cpu_pct"] = rounded(self.other_cpu_pct, 1)
        return document


@dataclass
class PipelineResult:
    name: str
    bursts: list[PhaseResult] = field(default_factory=list)
    paced: PhaseResult | None = None

    @property
    def burst(self) -> PhaseResult:
        """The median burst by throughput."""
        ordered = sorted(self.bursts, key=lambda b: b.rate)
        return ordered[len(ordered) // 2]

    @property
    def complete(self) -> bool:
        phases = [*self.bursts, *([self.paced] if self.paced else [])]
        return bool(phases) and all(p.delivered == p.emitted for p in phases)


class Bench:
    """The emulator, the receiver and what the phases share."""

    def __init__(self, emulator: GraphEmulator, counter: PathCounter, args: argparse.Namespace):
        self.emulator = emulator
        self.counter = counter
        self.args = args
        self.emit_times: dict[str, dict[int, float]] = {}

    async def emit_one(self, resource: str) -> None:
        seq = self.emulator.emitted.get(resource, 0) + 1
        self.emit_times.setdefault(resource, {})[seq] = time.monotonic()
        if await self.emulator.emit(resource) != 1:
            raise RuntimeError(f"{resource}: no consumer connected to hear notification {seq}")

    async def burst(self, resource: str, count: int) -> tuple[int, float, float]:
        """Emit `count` as fast as the emulator can; (first seq, first emit, last emit)."""
        first_seq = self.emulator.emitted.get(resource, 0) + 1
        started = time.monotonic()
        for index in range(count):
            await self.emit_one(resource)
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # let the emulator's socket writer run
        return first_seq, started, time.monotonic()

    async def paced(self, resource: str, rate: float, count: int) -> tuple[int, float, float]:
        """Emit `count` at `rate` per second on an absolute schedule (late ones go at once)."""
        first_seq = self.emulator.emitted.get(resource, 0) + 1
        started = time.monotonic()
        for index in range(count):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.emit_one(resource)
        return first_seq, started, time.monotonic()

    async def phase(
        self, child: Child, resource: str, path: str, count: int, rate: float | None
    ) -> PhaseResult:
        """Emit a burst (rate None) or a paced stream and wait until all of it has arrived."""
        if self.args.quiet_wait > 0:
            await wait_for_quiet([child.pid], max_wait=self.args.quiet_wait)
        base = self.counter.count(path)
        child_cpu, harness_cpu = cpu_seconds(child.pid), own_cpu_seconds()
        busy = system_busy_seconds()
        if rate is None:
            first_seq, started, emitted = await self.burst(resource, count)
        else:
            first_seq, started, emitted = await self.paced(resource, rate, count)
        # A timeout is not an error here: what did not arrive is reported as missing.
        await self.counter.wait(path, base + count, timeout=60.0 + count / 50, alive=child)
        child_cpu = cpu_seconds(child.pid) - child_cpu
        harness_cpu = own_cpu_seconds() - harness_cpu
        other_cpu = max(0.0, system_busy_seconds() - busy - child_cpu - harness_cpu)
        arrivals = self.counter.arrivals.get(path, [])[base:]
        times = self.emit_times[resource]
        wanted = range(first_seq, first_seq + count)
        seen: set[int] = set()
        latencies: list[float] = []
        last = started
        for at, body in arrivals:
            seq = notification_seq(body)
            if seq not in wanted:
                continue
            if seq in seen:
                continue
            seen.add(seq)
            latencies.append((at - times[seq]) * 1000)
            last = max(last, at)
        duplicates = sum(1 for _, body in arrivals if notification_seq(body) in wanted) - len(seen)
        seconds = last - started
        return PhaseResult(
            emitted=count,
            delivered=len(seen),
            duplicates=duplicates,
            seconds=seconds,
            emit_seconds=emitted - started,
            rate=len(seen) / seconds if seconds > 0 else math.nan,
            p50_ms=percentile(latencies, 50),
            p90_ms=percentile(latencies, 90),
            p99_ms=percentile(latencies, 99),
            max_ms=max(latencies, default=math.nan),
            child_cpu_s=child_cpu,
            harness_cpu_s=harness_cpu,
            other_cpu_s=other_cpu,
        )


def pipeline_child(
    name: str, bench: Bench, receiver: WebhookReceiver, workdir: Path, secret: str
) -> tuple[Child, str]:
    """The child process for a pipeline, and the drive resource it watches."""
    args = bench.args
    resource = f"drives/bench-{name}"
    log = workdir / name / "stderr.log"
    env = loop_env("asyncio" if name.endswith("-asyncio") else "default")
    if name.startswith("bare"):
        endpoint = f"{bench.emulator.base_url}/{resource}/root/subscriptions/socketIo"
        argv = [
            sys.executable,
            str(HERE / "bare_pipeline.py"),
            "--endpoint",
            endpoint,
            "--hook",
            receiver.url(name),
            "--concurrency",
            str(args.concurrency),
        ]
        return Child(argv, log, env=env), resource
    config = write_config(
        workdir / name,
        graph_url=bench.emulator.base_url,
        webhooks={"bench": receiver.url(name)},
        drives=[Drive(name="bench", resource=resource, webhook="bench")],
        secret=secret,
        concurrency=args.concurrency,
    )
    argv = relay_command(config, memory="memory" in name)
    return Child(argv, log, env=env), resource


async def run_pipeline(
    name: str, bench: Bench, receiver: WebhookReceiver, workdir: Path, secret: str
) -> PipelineResult:
    child, resource = pipeline_child(name, bench, receiver, workdir, secret)
    return await run_child(name, bench, child, resource)


async def run_child(name: str, bench: Bench, child: Child, resource: str) -> PipelineResult:
    """Connect the child's drive, then its warm-up, bursts and paced phase."""
    args = bench.args
    result = PipelineResult(name)
    async with child:
        await wait_until(
            lambda: bench.emulator.connected(resource) >= 1,
            timeout=CONNECT_TIMEOUT,
            what=f"{name} to connect",
            alive=child,
            interval=0.05,
        )
        if args.warmup:
            await bench.phase(child, resource, name, args.warmup, None)
        for _ in range(args.rounds):
            result.bursts.append(await bench.phase(child, resource, name, args.burst, None))
        if args.paced_seconds > 0:
            count = max(1, round(args.paced_rate * args.paced_seconds))
            result.paced = await bench.phase(child, resource, name, count, args.paced_rate)
    return result


@dataclass
class Ceilings:
    emit_calls_per_s: float  # emulator.emit() calls per second, consumer connected
    push_per_s: float  # first emit -> the counting consumer has read all
    receive_per_s: float  # POSTs per second the receiver answers, from a child
    receive_harness_cpu_pct: float


async def ceilings(bench: Bench, receiver: WebhookReceiver, workdir: Path, count: int) -> Ceilings:
    """The harness alone: emulator -> counting consumer, and POST load -> receiver."""
    args = bench.args
    resource = "drives/bench-null"
    endpoint = f"{bench.emulator.base_url}/{resource}/root/subscriptions/socketIo"
    script = str(HERE / "bare_pipeline.py")
    null = [sys.executable, script, "--endpoint", endpoint, "--null", "--expect", str(count)]
    warmup = min(args.warmup, count // 2)
    measured = count - warmup
    async with Child(null, workdir / "null" / "stderr.log", stdout=True) as child:
        await child.read_json(CONNECT_TIMEOUT)  # ready
        if args.quiet_wait > 0:
            await wait_for_quiet([child.pid], max_wait=args.quiet_wait)
        await bench.burst(resource, warmup)  # not counted: the consumer says done at `count`
        _, started, emitted = await bench.burst(resource, measured)
        done = await child.read_json(60.0 + count / 100)
    emit_rate = measured / (emitted - started)
    push_rate = measured / (float(done["last"]) - started)

    load = [
        sys.executable,
        script,
        "--hook",
        receiver.url("ceiling"),
        "--load",
        str(count),
        "--concurrency",
        str(args.concurrency),
    ]
    async with Child(load, workdir / "load" / "stderr.log", stdout=True) as child:
        harness_cpu = own_cpu_seconds()
        done = await child.read_json(60.0 + count / 100)
    harness_cpu = own_cpu_seconds() - harness_cpu
    seconds = float(done["end"]) - float(done["start"])
    if int(done["count"]) != count or int(done["errors"]):
        raise RuntimeError(f"receiver ceiling run: {done}")
    return Ceilings(
        emit_calls_per_s=emit_rate,
        push_per_s=push_rate,
        receive_per_s=count / seconds,
        receive_harness_cpu_pct=harness_cpu / seconds * 100,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(4096)
    secret = new_secret()
    counter = PathCounter()
    results: list[PipelineResult] = []
    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
        workdir = Path(tmp)
        async with (
            GraphEmulator(tokens=[TOKEN]) as emulator,
            WebhookReceiver(on_request=counter.on_request) as receiver,
        ):
            bench = Bench(emulator, counter, args)
            limits = await ceilings(bench, receiver, workdir, args.burst)
            for name in args.pipelines:
                results.append(await run_pipeline(name, bench, receiver, workdir, secret))
    return report(args, limits, results)


def report(
    args: argparse.Namespace, limits: Ceilings, results: list[PipelineResult]
) -> dict[str, Any]:
    by_name = {r.name: r for r in results}

    def ratio(a: str, b: str) -> float | None:
        if a in by_name and b in by_name:
            return rounded(by_name[a].burst.rate / by_name[b].burst.rate)
        return None

    def cpu_ratio(a: str, b: str) -> float | None:
        if a in by_name and b in by_name:
            cost_a = by_name[a].burst.child_cpu_us_per_notification
            return rounded(by_name[b].burst.child_cpu_us_per_notification / cost_a)
        return None

    return {
        "benchmark": "throughput",
        "machine": machine(),
        "settings": {
            "burst": args.burst,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "paced_rate": args.paced_rate,
            "paced_seconds": args.paced_seconds,
            "concurrency": args.concurrency,
            "signing": "relay pipelines sign (one whsec_ secret); bare does not",
        },
        "ceilings": {k: rounded(v, 1) for k, v in asdict(limits).items()},
        "pipelines": {
            r.name: {
                "complete": r.complete,
                "burst": r.burst.as_json(),
                "burst_rates": [rounded(b.rate, 1) for b in r.bursts],
                "paced": r.paced.as_json() if r.paced else None,
            }
            for r in results
        },
        "ratios": {
            "relay/bare": ratio("relay", "bare"),
            "relay/relay-memory": ratio("relay", "relay-memory"),
            "relay-memory/bare": ratio("relay-memory", "bare"),
        },
        # Throughput on a machine shared with other work is noisy; CPU per notification much
        # less so. These are b's CPU per notification / a's: the throughput each would reach if
        # CPU-bound on one core, relative to each other.
        "cpu_ratios": {
            "relay/bare": cpu_ratio("relay", "bare"),
            "relay/relay-memory": cpu_ratio("relay", "relay-memory"),
            "relay-memory/bare": cpu_ratio("relay-memory", "bare"),
        },
        "ok": all(r.complete for r in results),
    }


def render(document: dict[str, Any]) -> str:
    settings = document["settings"]
    limits = document["ceilings"]
    lines = [
        f"machine: {machine_line(document['machine'])}",
        f"burst N={settings['burst']} x {settings['rounds']} rounds (median shown),"
        f" paced {settings['paced_rate']:g}/s for {settings['paced_seconds']:g}s,"
        f" webhook concurrency {settings['concurrency']} for every pipeline;"
        f" {settings['signing']}",
        "",
        "harness ceilings (emulator and receiver in this process):",
        f"  emulator emit() calls/s, one counting consumer:  {limits['emit_calls_per_s']:,.0f}",
        f"  emulator push to a counting consumer, notif/s:    {limits['push_per_s']:,.0f}",
        f"  receiver POSTs/s answered (load from a child):    {limits['receive_per_s']:,.0f}"
        f"  (harness CPU {limits['receive_harness_cpu_pct']:.0f} %)",
        "",
    ]
    burst_rows = []
    paced_rows = []
    for name, result in document["pipelines"].items():
        burst = result["burst"]
        burst_rows.append(
            [
                name,
                burst["rate"],
                " ".join(f"{r:,.0f}" for r in result["burst_rates"]),
                burst["p50_ms"],
                burst["max_ms"],
                burst["child_cpu_us_per_notification"],
                burst["child_cpu_pct"],
                burst["harness_cpu_pct"],
                burst["other_cpu_pct"],
                f"{burst['delivered']}/{burst['emitted']}",
            ]
        )
        paced = result["paced"]
        if paced:
            paced_rows.append(
                [
                    name,
                    paced["p50_ms"],
                    paced["p90_ms"],
                    paced["p99_ms"],
                    paced["max_ms"],
                    paced["child_cpu_pct"],
                    paced["child_cpu_us_per_notification"],
                    f"{paced['delivered']}/{paced['emitted']}",
                ]
            )
    lines.append(
        "burst (CPU %: of one core; child = the pipeline's process, harness = this process,"
        " other = the rest of the machine, out of 200 %)"
    )
    lines.append(
        table(
            [
                "pipeline",
                "notif/s",
                "rounds",
                "p50 ms",
                "max ms",
                "CPU us/notif",
                "child CPU %",
                "harness CPU %",
                "other CPU %",
                "delivered",
            ],
            burst_rows,
        )
    )
    if paced_rows:
        lines.append("")
        lines.append(f"paced {settings['paced_rate']:g}/s: emit -> receiver latency")
        lines.append(
            table(
                [
                    "pipeline",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "CPU %",
                    "CPU us/notif",
                    "delivered",
                ],
                paced_rows,
            )
        )
    lines.append("")
    for key, value in document["ratios"].items():
        if value is not None:
            cpu = document["cpu_ratios"][key]
            lines.append(f"{key}: burst throughput {value:.2f}; by CPU per notification {cpu:.2f}")
    lines.append("all delivered: " + ("yes" if document["ok"] else "NO"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=5000, help="notifications per burst")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per pipeline (median shown)")
    parser.add_argument("--warmup", type=int, default=200, help="burst before measuring; 0: none")
    parser.add_argument("--paced-rate", type=float, default=200.0, help="notifications per second")
    parser.add_argument("--paced-seconds", type=float, default=5.0, help="0 skips the paced run")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="POSTs in flight, every pipeline"
    )
    parser.add_argument(
        "--pipelines",
        default=DEFAULT_PIPELINES,
        help=f"comma-separated, from {', '.join(PIPELINES)}",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each phase, wait up to this many seconds for the rest of the machine to be"
        " (nearly) idle: for shared machines; the 'other CPU %%' column shows what ran anyway",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    args.pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = [p for p in args.pipelines if p not in PIPELINES]
    if unknown:
        parser.error(f"unknown pipelines: {', '.join(unknown)}")
    if args.burst < 1 or args.rounds < 1 or args.paced_rate <= 0 or args.concurrency < 1:
        parser.error("--burst, --rounds, --concurrency must be >= 1 and --paced-rate > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    document = asyncio.run(run(args))
    if args.json:
        print_json(document)
    else:
        print(render(document))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
