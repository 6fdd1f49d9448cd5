"""Soak: relayd put through faults in a loop for minutes, and every notification accounted for.

    python benchmarks/soak.py [--minutes 3] [--rate 50] [--seed 1] [--json] [--keep DIR]

One real `python -m relayd run` child, its state_dir on a small real disk (a tmpfs of
`--disk-mib` MiB, tests/support/small_disk.py; needs root), watches `--drives` drives of the Graph
emulator in this process and delivers to two webhooks of the receiver in this process, "plain"
and "signed" (with a secret), with fast retries. Everything listens on 127.0.0.1.

* An emitter sends `--rate` notifications per second, round robin over the drives, for the whole
  fault window. Each carries the emulator's per-drive sequence number.
* Faults run one after another for `--minutes`, drawn from a deck of every kind shuffled with a
  seeded RNG (`--seed`), a calm spell between two: the webhook answers 503 or refuses
  connections for a few seconds; SIGHUP after the config changed (a rotated secret, or another
  timeout); the emulator drops every socket; SIGKILL then a restart; SIGTERM then a restart; the
  disk fills (all but ~100 KiB) and empties a few seconds later; the disk fills and relayd gets
  a SIGTERM while it is full.
* Then: the webhook answers 200, the disk has room, relayd runs; the soak waits (at most
  `--drain-timeout` s) until the outbox holds nothing pending or in flight, SIGTERMs relayd, and
  reads every row of the outbox file.

The figures (what each one counts is in benchmarks/README.md, "soak.py"): emitted, sent (written
to a connected socket), stored (a row in the outbox at the end), unstored (sent, never stored),
delivered per webhook (unique sequence numbers answered 2xx), duplicates, and lost (stored,
never delivered), which must be 0. The exit status is 1 if anything was lost, or if the run did
not complete (relayd could not be restarted, the backlog did not drain, the last stop was not
clean), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from benchkit import (
    TOKEN,
    Child,
    machine,
    machine_line,
    new_secret,
    print_json,
    relay_command,
    table,
)

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ReceivedRequest, ScriptedResponse
from relayd.signing import decode_secret, sign
from relayd.store import OUTBOX_FILE

# tests/support/small_disk.py is shared with the test suite; it is imported from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.small_disk import SmallDisk

PLAIN, SIGNED = "plain", "signed"
WEBHOOKS = (PLAIN, SIGNED)
FAST_RETRY = {"initial_delay": 0.1, "max_delay": 1.0}
TIMEOUTS = (5.0, 7.0)  # webhook timeouts a "reload-timeout" fault switches between
DISK_LEAVE = 100 << 10  # what a disk fault leaves free, bytes
CONNECT_TIMEOUT = 30.0  # a (re)start or a reconnect of every drive
STOP_TIMEOUT = 30.0  # SIGTERM -> exit; longer and relayd is SIGKILLed (and that is reported)
MAX_CRASH_RESTARTS = 20  # relayd exits nobody asked for, restarted; more ends the run
# Unstored notifications sent less than SPAN_GAP s apart form one span of time; a span is put
# down to the faults that were under way within NEAR s of it (what a SIGKILL loses was sent
# just before it).
SPAN_GAP = 1.0
NEAR = 1.0
# The disk counts as having run out when less than this is free.
RAN_OUT = 2 * DISK_LEAVE

FAULTS = (
    "webhook-503",
    "webhook-refused",
    "reload-secret",
    "reload-timeout",
    "kick",
    "sigkill",
    "sigterm",
    "disk-full",
    "disk-full-sigterm",
)

Key = tuple[str, int]  # (drive resource, emulator sequence number): one notification


class Clock:
    """Seconds since the soak started, for the timeline and the progress lines (stderr)."""

    def __init__(self) -> None:
        self.zero = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.zero

    def at(self, monotonic: float) -> float:
        return monotonic - self.zero

    def note(self, text: str) -> None:
        print(f"[{self.now():7.1f} s] {text}", file=sys.stderr, flush=True)


# -- the config --------------------------------------------------------------------------------


@dataclass
class RelayConfig:
    """The config file relayd runs with; reload faults change it and rewrite it."""

    path: Path
    graph_url: str
    receiver: WebhookReceiver
    state_dir: Path
    resources: Sequence[str]
    secrets: list[str] = field(default_factory=lambda: [new_secret()])  # newest first
    timeout: float = TIMEOUTS[0]
    # What relayd keeps free for delivering on a full disk (outbox.disk_reserve): an eighth of
    # the small disk, as the default 16 MiB is of a modest real volume.
    disk_reserve: int = 2 << 20
    used_secrets: list[str] = field(default_factory=list)  # every one configured, for checks

    def webhooks_of(self, index: int) -> str | list[str]:
        """Drives 0, 1: plain; 2: signed; 3 (and every 4th after): both, one row each."""
        choices: list[str | list[str]] = [PLAIN, PLAIN, SIGNED, [PLAIN, SIGNED]]
        return choices[index % 4]

    def document(self) -> dict[str, Any]:
        token_file = self.path.parent / "token"
        hook = {"retry": FAST_RETRY, "concurrency": 8}
        return {
            # The emulator is no tenant to protect: a budget far above what the run asks for, so
            # the figures measure relayd, not graph.requests_per_minute (docs/throttling.md).
            "graph": {"base_url": self.graph_url, "requests_per_minute": 1_000_000},
            "state_dir": str(self.state_dir),
            "admin": {"listen": ""},
            "log": {"level": "info", "format": "json"},
            "outbox": {"disk_reserve": self.disk_reserve},
            "accounts": {"soak": {"token_file": str(token_file)}},
            "webhooks": {
                PLAIN: {**hook, "url": self.receiver.url(PLAIN), "timeout": self.timeout},
                SIGNED: {**hook, "url": self.receiver.url(SIGNED), "secret": list(self.secrets)},
            },
            "drives": [
                {
                    "name": f"d{i}",
                    "account": "soak",
                    "resource": resource,
                    "webhook": self.webhooks_of(i),
                }
                for i, resource in enumerate(self.resources)
            ],
        }

    def write(self) -> None:
        """Write the file whole (a temporary file renamed over it): a SIGHUP never reads half."""
        (self.path.parent / "token").write_text(TOKEN)
        for secret in self.secrets:
            if secret not in self.used_secrets:
                self.used_secrets.append(secret)
        partial = self.path.with_suffix(".partial")
        partial.write_text(yaml.safe_dump(self.document(), sort_keys=False))
        os.replace(partial, self.path)

    def rotate_secret(self) -> None:
        """A new secret first, the previous one kept for the switch-over (Standard Webhooks
        rotation), older ones dropped."""
        self.secrets = [new_secret(), self.secrets[0]]

    def switch_timeout(self) -> None:
        self.timeout = TIMEOUTS[1] if self.timeout == TIMEOUTS[0] else TIMEOUTS[0]


# -- relayd across its restarts ----------------------------------------------------------------


@dataclass
class Incarnation:
    """One relayd process: how it ended, and what its log (its stderr) holds."""

    number: int
    log: Path
    started: float  # soak seconds
    ended: float | None = None
    end: str = "running"  # sigterm | sigkill | crash | final-sigterm | killed at exit
    exit_code: int | None = None
    stop_seconds: float | None = None  # SIGTERM -> exit


class Relay:
    """The `relayd run` child across restarts. Whoever starts, signals or restarts it holds
    `lock`; `watch()` restarts a relayd that exited without being asked to (a crash)."""

    def __init__(
        self, config: RelayConfig, logs: Path, emulator: GraphEmulator, clock: Clock
    ) -> None:
        self.config = config
        self.logs = logs
        self.emulator = emulator
        self.clock = clock
        self.lock = asyncio.Lock()
        self.child: Child | None = None
        self.runs: list[Incarnation] = []
        self.crashes = 0

    @property
    def current(self) -> Incarnation:
        return self.runs[-1]

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def exit_code(self) -> int | None:
        """The current relayd's exit status, None while it runs."""
        process = None if self.child is None else self.child.process
        return None if process is None else process.returncode

    async def start(self) -> float | None:
        """Start a relayd; seconds until every drive connected (afresh), None if not within
        CONNECT_TIMEOUT (it keeps running: the drain will show whether it recovers)."""
        before = dict(self.emulator.connects)
        number = len(self.runs) + 1
        log = self.logs / f"relayd-{number:02d}.log"
        self.child = Child(relay_command(self.config.path), log, stop_timeout=STOP_TIMEOUT)
        self.runs.append(Incarnation(number, log, self.clock.now()))
        await self.child.start()
        return await self.connected(before)

    async def connected(self, before: Mapping[str, int]) -> float | None:
        """Seconds until every drive has made a connection since `before` (the emulator's
        `connects`) and has one up; None after CONNECT_TIMEOUT or if relayd exited."""
        started = time.monotonic()
        while time.monotonic() - started < CONNECT_TIMEOUT and self.alive():
            if all(
                self.emulator.connects[r] > before.get(r, 0) and self.emulator.connected(r) >= 1
                for r in self.config.resources
            ):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        return None

    def signal(self, signum: int) -> None:
        assert self.child is not None and self.child.process is not None
        self.child.process.send_signal(signum)

    async def stop(self, how: str) -> Incarnation:
        """End the current relayd: `how` is "sigkill", or a SIGTERM ("sigterm", "final-sigterm")
        given STOP_TIMEOUT to exit before a SIGKILL."""
        run, child = self.current, self.child
        assert child is not None
        if not child.alive():  # it exited by itself a moment ago: that is a crash, not ours
            self.crashes += 1
            run.end, run.exit_code, run.ended = "crash", self.exit_code(), self.clock.now()
            return run
        started = time.monotonic()
        if how == "sigkill":
            await child.kill()
        else:
            await child.stop()
            run.stop_seconds = time.monotonic() - started
        run.end, run.exit_code, run.ended = how, child.exit_code, self.clock.now()
        return run

    async def watch(self, give_up: asyncio.Event) -> None:
        """Restart relayd whenever it has exited on its own; sets `give_up` after too many."""
        while True:
            await asyncio.sleep(0.25)
            async with self.lock:
                if self.child is None or self.alive():
                    continue
                run = self.current
                run.end, run.exit_code, run.ended = "crash", self.exit_code(), self.clock.now()
                self.crashes += 1
                if self.crashes > MAX_CRASH_RESTARTS:
                    self.clock.note(f"relayd exited by itself {self.crashes} times: giving up")
                    give_up.set()
                    return
                await asyncio.sleep(1.0)  # a relayd that cannot start must not spin
                self.clock.note(f"relayd exited by itself (code {run.exit_code}): restarting")
                await self.start()

    async def reload(self) -> str:
        """SIGHUP, then what the log says within 5 s."""
        offset = log_size(self.current.log)
        self.signal(signal.SIGHUP)
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            await asyncio.sleep(0.1)
            for line in await asyncio.to_thread(log_events, self.current.log, offset):
                if line.get("event") in ("config reloaded", "config reload refused"):
                    return f"{line['event']} after {time.monotonic() - started:.1f} s"
        return "no 'config reloaded' in the log within 5 s"

    async def kill_at_exit(self) -> None:
        """Whatever happens, no relayd outlives the soak (it holds the small disk open)."""
        if self.alive():
            assert self.child is not None
            await self.child.kill()
            run = self.current
            run.end, run.exit_code, run.ended = "killed at exit", self.child.exit_code, None


# -- logs --------------------------------------------------------------------------------------

WARNING_LEVELS = ("warning", "error", "critical", "exception")
LOSS_WORDS = ("lost", "lose", "drop", "discard", "unsaved", "not written")


def log_size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0


def log_events(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """relayd's JSON log lines from byte `offset` on; any other line (a traceback) becomes
    {"event": <the line>, "level": "raw"}."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        events.append(value if isinstance(value, dict) else {"event": line, "level": "raw"})
    return events


def describe_event(event: Mapping[str, Any]) -> str:
    """One log line, short: level, event, and its fields but the usual ones."""
    skip = {"event", "level", "timestamp", "logger"}
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    return f"{event.get('level')}: {event.get('event')}" + (f" ({fields})" if fields else "")[:300]


def summarize_logs(runs: Sequence[Incarnation]) -> dict[str, Any]:
    """Warnings and errors over every relayd log, counted by event; tracebacks; and for each
    SIGTERM, what relayd logged after "stopping" (it should say what it could not keep)."""
    counts: Counter[str] = Counter()
    tracebacks: list[str] = []
    stops: list[dict[str, Any]] = []
    for run in runs:
        events = log_events(run.log)
        for event in events:
            level = str(event.get("level"))
            if level in WARNING_LEVELS:
                counts[f"{level}: {event.get('event')}"] += 1
            elif level == "raw" and str(event["event"]).startswith("Traceback"):
                tracebacks.append(f"relayd-{run.number:02d}.log")
        if run.end in ("sigterm", "final-sigterm"):
            stops.append(sigterm_summary(run, events))
    raw = [
        str(e["event"])
        for run in runs
        for e in log_events(run.log)
        if e.get("level") == "raw" and str(e["event"]).strip()
    ]
    return {
        "warnings_and_errors": dict(counts.most_common()),
        "tracebacks": tracebacks,
        "raw_lines": raw[:40],
        "sigterms": stops,
    }


def sigterm_summary(run: Incarnation, events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What one relayd logged between "stopping" and its exit: warnings and errors counted by
    event, and any line that speaks of losing or dropping something (sockets aside)."""
    after = False
    counted: Counter[str] = Counter()
    losses: list[str] = []
    for event in events:
        if event.get("event") == "stopping":
            after = True
            continue
        if not after:
            continue
        if event.get("level") in WARNING_LEVELS:
            counted[f"{event.get('level')}: {event.get('event')}"] += 1
        text = json.dumps(event).lower()
        if event.get("event") != "connection lost" and any(w in text for w in LOSS_WORDS):
            losses.append(describe_event(event))
    return {
        "relayd": run.number,
        "at_s": run.ended,
        "end": run.end,
        "exit_code": run.exit_code,
        "stop_s": run.stop_seconds,
        "logged_stopping": after,
        "warnings_after_stopping": dict(counted.most_common()),
        "loss_lines": losses[:10],
    }


# -- the emitter, the disk sampler ---------------------------------------------------------------


class Emitter:
    """`rate` notifications per second, round robin over the drives, until `stop` is set.

    `sent` holds every one the emulator wrote to at least one connected socket, with the time.
    """

    def __init__(self, emulator: GraphEmulator, resources: Sequence[str], rate: float) -> None:
        self.emulator = emulator
        self.resources = resources
        self.rate = rate
        self.sent: dict[Key, float] = {}

    @property
    def emitted(self) -> int:
        return sum(self.emulator.emitted.get(r, 0) for r in self.resources)

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        index = 0
        # Stopped between two emits, never cancelled in one: a sequence number taken is counted.
        while not stop.is_set():
            delay = started + index / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            resource = self.resources[index % len(self.resources)]
            reached = await self.emulator.emit(resource)
            if reached:
                self.sent[(resource, self.emulator.emitted[resource])] = time.monotonic()
            index += 1


@dataclass
class DiskReadings:
    """The small disk, sampled every second: (soak s, free KiB, outbox KiB, WAL KiB)."""

    samples: list[tuple[float, int, int, int]] = field(default_factory=list)

    async def sample(self, state_dir: Path, clock: Clock) -> None:
        while True:
            with contextlib.suppress(OSError):
                stat = os.statvfs(state_dir)
                self.samples.append(
                    (
                        round(clock.now(), 1),
                        stat.f_bavail * stat.f_frsize >> 10,
                        file_size(state_dir / OUTBOX_FILE) >> 10,
                        file_size(state_dir / f"{OUTBOX_FILE}-wal") >> 10,
                    )
                )
            await asyncio.sleep(1.0)

    def summary(self, faults: Sequence[Fault]) -> dict[str, Any]:
        """Peaks, and the spans of time the disk had run out while no disk fault was under way:
        relayd itself filled it (its WAL, say)."""
        disk_faults = [f for f in faults if f.kind.startswith("disk-full")]
        by_itself = [
            at
            for at, free, _, _ in self.samples
            if free << 10 < RAN_OUT
            and not any(f.started - NEAR <= at <= f.ended + NEAR for f in disk_faults)
        ]
        return {
            "min_free_kib": min((s[1] for s in self.samples), default=None),
            "max_db_kib": max((s[2] for s in self.samples), default=0),
            "max_wal_kib": max((s[3] for s in self.samples), default=0),
            "ran_out_by_itself": [
                [span["first"], span["last"]] for span in spans(by_itself, [], gap=2.5)
            ],
            "samples": self.samples,
        }


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- the outbox, read from its file --------------------------------------------------------------


def outbox_states(path: Path) -> dict[str, int]:
    """Rows per state, read-only (relayd may be writing)."""
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
    finally:
        db.close()


def outbox_rows(path: Path) -> list[tuple[str, str, bytes]]:
    """(webhook, state, body) of every row."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return list(db.execute("SELECT webhook, state, body FROM deliveries").fetchall())
    finally:
        db.close()


def event_of(body: bytes) -> tuple[str, Key | None]:
    """The event type of a body relayd sends, and for a notification its (resource, seq)."""
    document = json.loads(body)
    if document.get("type") != "drive.notification":
        return str(document.get("type")), None
    data = document["data"]
    return "drive.notification", (data["resource"], int(data["notification"]["relaydEmulatorSeq"]))


# -- faults ------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    started: float  # soak seconds
    ended: float = 0.0
    detail: str = ""


class Soak:
    """Everything a run holds; the faults are its methods, named after FAULTS."""

    def __init__(
        self,
        args: argparse.Namespace,
        emulator: GraphEmulator,
        receiver: WebhookReceiver,
        disk: SmallDisk,
        relay: Relay,
        clock: Clock,
    ) -> None:
        self.args = args
        self.emulator = emulator
        self.receiver = receiver
        self.disk = disk
        self.relay = relay
        self.clock = clock
        self.rng = random.Random(args.seed)
        self.faults: list[Fault] = []
        self.problems: list[str] = []  # why the run did not complete, if it did not

    async def fault_loop(self, until: float, give_up: asyncio.Event) -> None:
        """Faults from a shuffled deck of every kind, a calm spell of 2-4 s after each."""
        deck: list[str] = []
        actions: dict[str, Callable[[], Awaitable[str]]] = {
            kind: getattr(self, "fault_" + kind.replace("-", "_")) for kind in FAULTS
        }
        while time.monotonic() < until and not give_up.is_set():
            if not deck:
                deck = list(self.args.faults)
                self.rng.shuffle(deck)
            fault = Fault(deck.pop(), self.clock.now())
            self.clock.note(f"fault {fault.kind} ...")
            fault.detail = await actions[fault.kind]()
            fault.ended = self.clock.now()
            self.faults.append(fault)
            self.clock.note(f"fault {fault.kind}: {fault.detail}")
            await asyncio.sleep(self.rng.uniform(2.0, 4.0))

    async def fault_webhook_503(self) -> str:
        hooks = self.rng.choice([[PLAIN], [SIGNED], [PLAIN, SIGNED]])
        seconds = self.rng.uniform(2.0, 5.0)
        for hook in hooks:
            self.receiver.set_default(hook, ScriptedResponse(status=503))
        await asyncio.sleep(seconds)
        for hook in hooks:
            self.receiver.set_default(hook, ScriptedResponse(status=200))
        return f"{'+'.join(hooks)} answered 503 for {seconds:.1f} s"

    async def fault_webhook_refused(self) -> str:
        seconds = self.rng.uniform(2.0, 5.0)
        await self.receiver.stop()
        await asyncio.sleep(seconds)
        await self.start_receiver()
        return f"receiver closed (connection refused) for {seconds:.1f} s"

    async def start_receiver(self) -> None:
        """Serve again on the same port; a port still held a moment is retried for 10 s."""
        for _ in range(100):
            try:
                await self.receiver.start()
                return
            except OSError:
                await asyncio.sleep(0.1)
        await self.receiver.start()

    async def fault_reload_secret(self) -> str:
        self.relay.config.rotate_secret()
        return await self.reload("signed's secret rotated")

    async def fault_reload_timeout(self) -> str:
        self.relay.config.switch_timeout()
        return await self.reload(f"plain's timeout now {self.relay.config.timeout:g} s")

    async def reload(self, change: str) -> str:
        async with self.relay.lock:
            await asyncio.to_thread(self.relay.config.write)
            if not self.relay.alive():
                return f"{change}; relayd not running, no SIGHUP"
            return f"{change}; SIGHUP: {await self.relay.reload()}"

    async def fault_kick(self) -> str:
        before = dict(self.emulator.connects)
        kicked = 0
        for resource in self.relay.config.resources:
            kicked += await self.emulator.kick(resource)
        seconds = await self.relay.connected(before)
        back = "not all back" if seconds is None else f"all back in {seconds:.1f} s"
        return f"{kicked} sockets dropped by the emulator; {back}"

    async def fault_sigkill(self) -> str:
        async with self.relay.lock:
            run = await self.relay.stop("sigkill")
            return f"relayd-{run.number:02d} SIGKILLed; {await self.restart()}"

    async def fault_sigterm(self) -> str:
        async with self.relay.lock:
            return f"{await self.sigterm()}; {await self.restart()}"

    async def sigterm(self) -> str:
        run = await self.relay.stop("sigterm")
        if run.stop_seconds is None:
            return f"relayd-{run.number:02d} had exited by itself (code {run.exit_code})"
        return (
            f"relayd-{run.number:02d} SIGTERMed: exit {run.exit_code} in {run.stop_seconds:.1f} s"
        )

    async def restart(self) -> str:
        seconds = await self.relay.start()
        run = self.relay.current
        if seconds is not None:
            return f"relayd-{run.number:02d} started, all drives connected in {seconds:.1f} s"
        if not self.relay.alive():
            first = (log_events(run.log) or [{"event": "(empty log)"}])[0]
            return (
                f"relayd-{run.number:02d} exited at start (code {self.relay.exit_code()}):"
                f" {str(first.get('event'))[:200]}"
            )
        return f"relayd-{run.number:02d} started, drives not all connected within 30 s"

    async def fault_disk_full(self) -> str:
        seconds = self.rng.uniform(3.0, 6.0)
        await asyncio.to_thread(self.disk.fill, DISK_LEAVE)
        free = await asyncio.to_thread(self.disk.free_bytes)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(self.disk.empty)
        return f"disk filled ({free >> 10} KiB free) for {seconds:.1f} s, then emptied"

    async def fault_disk_full_sigterm(self) -> str:
        async with self.relay.lock:
            await asyncio.to_thread(self.disk.fill, DISK_LEAVE)
            free = await asyncio.to_thread(self.disk.free_bytes)
            await asyncio.sleep(2.0)
            stopped = await self.sigterm()
            await asyncio.to_thread(self.disk.empty)
            return f"disk filled ({free >> 10} KiB free), 2 s later {stopped}; emptied; " + (
                await self.restart()
            )

    # -- after the faults ----------------------------------------------------------------------

    async def recover(self) -> None:
        """The webhook answers 200, the disk has room, relayd runs."""
        for hook in WEBHOOKS:
            self.receiver.set_default(hook, ScriptedResponse(status=200))
        with contextlib.suppress(RuntimeError):  # already running
            await self.start_receiver()
        await asyncio.to_thread(self.disk.empty)
        async with self.relay.lock:
            if not self.relay.alive():
                await self.restart()

    async def drain(self, outbox: Path) -> dict[str, Any]:
        """Wait until no row is pending or in flight and no row came for 2 s; bounded."""
        started = time.monotonic()
        previous: dict[str, int] = {}
        quiet_since = time.monotonic()
        states: dict[str, int] = {}
        while time.monotonic() - started < self.args.drain_timeout:
            await asyncio.sleep(1.0)
            try:
                states = await asyncio.to_thread(outbox_states, outbox)
            except sqlite3.Error as exc:  # locked a moment, or the file is unreadable
                states = {"unreadable": 1}
                self.clock.note(f"drain: cannot read the outbox: {exc}")
            if states != previous:
                previous, quiet_since = states, time.monotonic()
            waiting = states.get("pending", 0) + states.get("inflight", 0)
            if waiting == 0 and "unreadable" not in states and time.monotonic() - quiet_since >= 2:
                return {"drained": True, "seconds": time.monotonic() - started, "states": states}
        return {"drained": False, "seconds": time.monotonic() - started, "states": states}


# -- the account -------------------------------------------------------------------------------


def delivered_by_hook(
    requests: Iterable[ReceivedRequest], secrets: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per webhook, from the requests the receiver answered 2xx: the notification keys (as a
    Counter: copies count), resync events by reason, and signed deliveries no secret verifies."""
    keys = [decode_secret(s) for s in secrets]
    out: dict[str, dict[str, Any]] = {
        hook: {"keys": Counter(), "resyncs": Counter(), "bad_signatures": 0} for hook in WEBHOOKS
    }
    for request in requests:
        hook = out.get(request.name)
        if hook is None:
            continue
        kind, key = event_of(request.body)
        if key is not None:
            hook["keys"][key] += 1
        elif kind == "drive.resync":
            hook["resyncs"][json.loads(request.body)["data"]["reason"]] += 1
        if request.name == SIGNED and not signature_ok(request, keys):
            hook["bad_signatures"] += 1
    return out


def signature_ok(request: ReceivedRequest, keys: Sequence[bytes]) -> bool:
    """Some configured secret's signature is among the ones the request carries."""
    given = set(request.headers.get("webhook-signature", "").split())
    try:
        message_id = request.headers["webhook-id"]
        stamp = int(request.headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    return any(sign([key], message_id, stamp, request.body) in given for key in keys)


def spans(
    times: Iterable[float], faults: Sequence[Fault], gap: float = SPAN_GAP
) -> list[dict[str, Any]]:
    """Soak times (seconds) grouped into spans (a pause of `gap` s or more starts a new one),
    each with the faults under way near it."""
    out: list[dict[str, Any]] = []
    for at in sorted(times):
        if out and at - out[-1]["last"] < gap:
            out[-1]["last"] = at
            out[-1]["count"] += 1
        else:
            out.append({"first": at, "last": at, "count": 1})
    for span in out:
        span["faults"] = [
            f"{f.kind}@{f.started:.1f}"
            for f in faults
            if f.started - NEAR <= span["last"] and span["first"] <= f.ended + NEAR
        ]
        span["first"], span["last"] = round(span["first"], 2), round(span["last"], 2)
    return out


def account(soak: Soak, emitter: Emitter, rows: Sequence[tuple[str, str, bytes]]) -> dict[str, Any]:
    stored: dict[str, Counter[Key]] = {hook: Counter() for hook in WEBHOOKS}
    states: dict[str, Counter[str]] = {hook: Counter() for hook in WEBHOOKS}
    for webhook, state, body in rows:
        _, key = event_of(body)
        if key is not None and webhook in stored:
            stored[webhook][key] += 1
            states[webhook][state] += 1
    got = delivered_by_hook(soak.receiver.received, soak.relay.config.used_secrets)
    hooks: dict[str, Any] = {}
    for hook in WEBHOOKS:
        rows_in, at_receiver = set(stored[hook]), got[hook]["keys"]
        lost = sorted(rows_in - set(at_receiver))
        hooks[hook] = {
            "rows": sum(stored[hook].values()),
            "stored": len(rows_in),
            "delivered": len(at_receiver),
            "duplicates": sum(at_receiver.values()) - len(at_receiver),
            "lost": len(lost),
            "lost_sample": [f"{r}#{s}" for r, s in lost[:10]],
            "delivered_without_row": len(set(at_receiver) - rows_in),
            "states": dict(states[hook]),
            "resyncs_delivered": dict(got[hook]["resyncs"]),
            "bad_signatures": got[hook]["bad_signatures"],
        }
    stored_any = set(stored[PLAIN]) | set(stored[SIGNED])
    unstored = [k for k in emitter.sent if k not in stored_any]
    unstored_spans = spans((soak.clock.at(emitter.sent[k]) for k in unstored), soak.faults)
    return {
        "emitted": emitter.emitted,
        "sent": len(emitter.sent),
        "unsent": emitter.emitted - len(emitter.sent),
        "stored": len(stored_any),
        "unstored": len(unstored),
        "unstored_spans": unstored_spans,
        "stored_unsent": len(stored_any - set(emitter.sent)),
        "webhooks": hooks,
        "lost": sum(h["lost"] for h in hooks.values()),
    }


# -- the run -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    clock = Clock()
    resources = [f"drives/soak-{i}" for i in range(args.drives)]
    with SmallDisk(workdir / "disk", size=args.disk_mib << 20) as disk:
        async with (
            GraphEmulator(tokens=[TOKEN]) as emulator,
            WebhookReceiver() as receiver,
        ):
            config = RelayConfig(
                workdir / "config.yaml",
                emulator.base_url,
                receiver,
                disk.path / "state",
                resources,
                disk_reserve=max(1 << 20, (args.disk_mib << 20) // 8),
            )
            config.write()
            relay = Relay(config, workdir / "logs", emulator, clock)
            soak = Soak(args, emulator, receiver, disk, relay, clock)
            emitter = Emitter(emulator, resources, args.rate)
            try:
                document = await phases(soak, emitter, disk)
            finally:
                await relay.kill_at_exit()
                if args.keep is not None:
                    keep(args.keep, workdir, disk.path / "state")
    document["seconds"] = round(clock.now(), 1)
    return document


async def phases(soak: Soak, emitter: Emitter, disk: SmallDisk) -> dict[str, Any]:
    args, relay, clock = soak.args, soak.relay, soak.clock
    outbox = relay.config.state_dir / OUTBOX_FILE
    async with relay.lock:
        if await relay.start() is None:
            raise RuntimeError(
                f"relayd did not connect every drive:\n{relay.child and relay.child.tail()}"
            )
    clock.note(
        f"relayd up, {len(relay.config.resources)} drives connected;"
        f" faults for {args.minutes:g} min"
    )
    stop_emitting, give_up = asyncio.Event(), asyncio.Event()
    readings = DiskReadings()
    helpers = [
        asyncio.create_task(emitter.run(stop_emitting), name="soak-emitter"),
        asyncio.create_task(readings.sample(relay.config.state_dir, clock), name="soak-disk"),
        asyncio.create_task(relay.watch(give_up), name="soak-watch"),
    ]
    try:
        await soak.fault_loop(time.monotonic() + args.minutes * 60, give_up)
        window = clock.now()
        stop_emitting.set()
        await helpers[0]
        clock.note(f"faults over; {emitter.emitted} emitted; recovering and draining")
        await soak.recover()
        if give_up.is_set():
            states = await asyncio.to_thread(outbox_states, outbox)
            drain = {"drained": False, "seconds": None, "states": states, "skipped": True}
        else:
            drain = await soak.drain(outbox)
        helpers[2].cancel()  # the final SIGTERM is ours: no restart after it
        async with relay.lock:
            final = await relay.stop("final-sigterm") if relay.alive() else None
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    clock.note(f"drain: {drain}; final stop: exit {final and final.exit_code}")
    rows = await asyncio.to_thread(outbox_rows, outbox)
    figures = account(soak, emitter, rows)
    problems = completion_problems(soak, give_up.is_set(), drain, final)
    return {
        "benchmark": "soak",
        "machine": machine(),
        "settings": {
            "minutes": args.minutes,
            "rate": args.rate,
            "seed": args.seed,
            "drives": args.drives,
            "disk_mib": args.disk_mib,
            "drain_timeout": args.drain_timeout,
            "faults": args.faults,
        },
        "fault_window_s": round(window, 1),
        "faults": [asdict(f) for f in soak.faults],
        "fault_counts": dict(Counter(f.kind for f in soak.faults)),
        "relayd_processes": [asdict(r) | {"log": r.log.name} for r in relay.runs],
        "crashes": relay.crashes,
        "drain": drain,
        "disk": {
            "size_mib": args.disk_mib,
            **readings.summary(soak.faults),
            "db_kib_at_end": file_size(outbox) >> 10,
            "wal_kib_at_end": file_size(outbox.with_name(OUTBOX_FILE + "-wal")) >> 10,
        },
        "figures": figures,
        "logs": summarize_logs(relay.runs),
        "complete": not problems,
        "problems": problems,
        "ok": not problems and figures["lost"] == 0,
    }


def completion_problems(
    soak: Soak, gave_up: bool, drain: Mapping[str, Any], final: Incarnation | None
) -> list[str]:
    problems = list(soak.problems)
    if gave_up:
        problems.append(f"relayd exited by itself more than {MAX_CRASH_RESTARTS} times")
    if not drain.get("drained"):
        problems.append(
            f"the backlog did not drain within {soak.args.drain_timeout:g} s:"
            f" outbox states {drain.get('states')}"
        )
    if final is None:
        problems.append("relayd was not running at the end")
    elif final.exit_code != 0:
        problems.append(f"the last SIGTERM: exit {final.exit_code} after {final.stop_seconds} s")
    return problems


def keep(folder: Path, workdir: Path, state_dir: Path) -> None:
    """Copy the logs, the config and the outbox (off the small disk, which goes) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("logs", "config.yaml"):
        source = workdir / name
        if source.is_dir():
            shutil.copytree(source, folder / name, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, folder / name)
    if state_dir.is_dir():
        shutil.copytree(state_dir, folder / "state", dirs_exist_ok=True)


# -- output ------------------------------------------------------------------------------------


def render(document: Mapping[str, Any]) -> str:
    s, f = document["settings"], document["figures"]
    lines = [
        f"machine: {machine_line(document['machine'])}",
        f"soak: {document['fault_window_s']:g} s of faults (--minutes {s['minutes']:g}),"
        f" {s['rate']:g} notifications/s over {s['drives']} drives, seed {s['seed']},"
        f" state_dir on a {s['disk_mib']} MiB tmpfs; {document['seconds']:g} s in all",
        "",
        "faults: " + ", ".join(f"{k} x{n}" for k, n in sorted(document["fault_counts"].items())),
    ]
    lines += [
        f"  {x['started']:6.1f}-{x['ended']:6.1f} s  {x['kind']:<18} {x['detail']}"
        for x in document["faults"]
    ]
    runs = document["relayd_processes"]
    lines += [
        "",
        f"relayd processes: {len(runs)}; exits nobody asked for: {document['crashes']}",
        render_drain(document["drain"]),
        render_disk(document["disk"]),
        "",
        "notifications (one = one emulator sequence number of one drive):",
        f"  emitted   {f['emitted']:>7,}  by the emulator",
        f"  sent      {f['sent']:>7,}  written to a connected socket"
        f" ({f['unsent']:,} emitted while no socket of the drive was up)",
        f"  stored    {f['stored']:>7,}  with a row in the outbox at the end",
        f"  unstored  {f['unstored']:>7,}  sent but never stored",
        *render_spans(f["unstored_spans"]),
        "",
    ]
    lines.append(render_hooks(f["webhooks"]))
    lines += ["", *render_logs(document["logs"]), ""]
    lines.append(
        f"lost (stored, never delivered): {f['lost']}"
        + (" -> OK" if not f["lost"] else " -> FAILED")
    )
    for problem in document["problems"]:
        lines.append(f"incomplete: {problem}")
    return "\n".join(lines)


def render_drain(drain: Mapping[str, Any]) -> str:
    if drain.get("drained"):
        return f"drain: nothing pending or in flight {drain['seconds']:.1f} s after the faults"
    seconds = drain.get("seconds")
    when = "(not waited for: relayd would not stay up)" if drain.get("skipped") else ""
    when = f"after {seconds:.0f} s" if seconds is not None else when
    return f"drain: STUCK {when}: outbox states {drain.get('states')}"


def render_disk(disk: Mapping[str, Any]) -> str:
    text = (
        f"disk: {disk['size_mib']} MiB; outbox file up to {disk['max_db_kib']:,} KiB, WAL up to"
        f" {disk['max_wal_kib']:,} KiB (at the end {disk['db_kib_at_end']:,} and"
        f" {disk['wal_kib_at_end']:,} KiB); least free {disk['min_free_kib']} KiB (sampled 1/s)"
    )
    ran_out = disk["ran_out_by_itself"]
    if ran_out:
        when = ", ".join(f"{a:.0f}-{b:.0f} s" for a, b in ran_out)
        text += f"\n  the disk was FULL with no disk fault under way: {when}"
    return text


def render_hooks(hooks: Mapping[str, Mapping[str, Any]]) -> str:
    headers = ["webhook", "rows", "stored", "delivered", "duplicates", "lost", "no row"]
    headers += ["bad sig", "states at end", "resyncs"]
    rows = [
        [
            name,
            h["rows"],
            h["stored"],
            h["delivered"],
            h["duplicates"],
            h["lost"],
            h["delivered_without_row"],
            h["bad_signatures"] if name == SIGNED else None,
            fmt_counts(h["states"]),
            fmt_counts(h["resyncs_delivered"]),
        ]
        for name, h in hooks.items()
    ]
    text = table(headers, rows)
    for name, h in hooks.items():
        if h["lost_sample"]:
            text += f"\n  {name} lost, first ones: {' '.join(h['lost_sample'])}"
    return text


def render_logs(logs: Mapping[str, Any]) -> list[str]:
    lines = ["relayd's logs, warnings and errors (all processes):"]
    lines += [f"  {n:>6,}  {event}" for event, n in logs["warnings_and_errors"].items()] or [
        "  none"
    ]
    if logs["tracebacks"]:
        lines.append(f"  tracebacks in: {', '.join(logs['tracebacks'])}")
    lines.append("what relayd logged after 'stopping' at each SIGTERM:")
    for stop in logs["sigterms"]:
        said = "; ".join(stop["loss_lines"]) or "nothing about losses"
        if stop["warnings_after_stopping"]:
            said += "; warnings/errors: " + fmt_counts(stop["warnings_after_stopping"])
        if not stop["logged_stopping"]:
            said = "no 'stopping' line at all"
        lines.append(
            f"  relayd-{stop['relayd']:02d} ({stop['end']}, exit {stop['exit_code']},"
            f" {stop['stop_s'] or 0:.1f} s): {said}"
        )
    return lines


def render_spans(found: Sequence[Mapping[str, Any]]) -> list[str]:
    """Unstored notifications by when they were sent, with the faults under way then."""
    lines = [
        f"            {x['count']:>7,}  sent {x['first']:.1f}-{x['last']:.1f} s;"
        f" faults then: {', '.join(x['faults']) or 'none'}"
        for x in found[:12]
    ]
    if len(found) > 12:
        lines.append(f"            (and {len(found) - 12} more spans)")
    return lines


def fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "-"


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the fault window")
    parser.add_argument("--rate", type=float, default=50.0, help="notifications per second")
    parser.add_argument("--seed", type=int, default=1, help="the fault order's RNG seed")
    parser.add_argument("--drives", type=int, default=4, help="drives relayd watches")
    parser.add_argument("--disk-mib", type=int, default=16, help="size of the state_dir's tmpfs")
    parser.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds the backlog gets to drain"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="copy logs, config and outbox here at the end"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated kinds to draw from (default: all of {', '.join(FAULTS)})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    args.faults = [kind.strip() for kind in args.faults.split(",") if kind.strip()]
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown or not args.faults:
        parser.error(f"--faults: unknown or none: {', '.join(unknown)}")
    if not 0 < args.minutes <= 60 or not 0 < args.rate <= 1000 or not 1 <= args.drives <= 64:
        parser.error("--minutes in (0, 60], --rate in (0, 1000], --drives in [1, 64]")
    if args.disk_mib < 4 or args.drain_timeout <= 0:
        parser.error("--disk-mib must be >= 4 and --drain-timeout > 0")
    if os.geteuid() != 0:
        parser.error("the small disk is a tmpfs mounted on the host: run as root")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM to the soak ends it as Ctrl-C does: relayd killed, the small disk unmounted.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with tempfile.TemporaryDirectory(prefix="relayd-soak-") as tmp:
        return await run(args, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        document = asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak interrupted; relayd killed, small disk unmounted", file=sys.stderr)
        return 130
    if args.json:
        print_json(document)
    else:
        print(render(document))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
