"""Shared pieces of the benchmarks: child processes, /proc readings, configs, tables, statistics.

Every benchmark script in this folder is run as `python benchmarks/NAME.py`, so this module is
imported by its plain name (the script's folder is first on sys.path).

Times that cross processes are `time.monotonic()` readings: on Linux that is CLOCK_MONOTONIC,
one clock for every process on the machine, so an emit time taken in the benchmark process and an
arrival time taken in a child can be subtracted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import resource
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- machine and process readings ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on: architecture, CPU model, cores, memory, Python."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {
        "arch": platform.machine(),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def machine_line(info: Mapping[str, Any]) -> str:
    return (
        f"{info['arch']}, {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB,"
        f" Linux {info['kernel']}, Python {info['python']}"
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # After "pid (comm) ": state is field 3, utime field 14, stime field 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def system_busy_seconds() -> float:
    """CPU time all processes on the machine have used (every core, idle and iowait excluded),
    from /proc/stat: minus what the benchmark's own processes used, it shows how much else ran
    during a measurement (other sessions' test suites on a shared machine, say)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


async def wait_for_quiet(
    pids: Sequence[int], *, max_wait: float, threshold_pct: float = 20.0
) -> float:
    """Wait (at most `max_wait` seconds) for a second in which the rest of the machine (all but
    this process and `pids`) used less than `threshold_pct` % of one core. On a machine shared
    with other work that keeps the figures closer to what the relay alone would show. Returns
    the last second's figure, whether or not it got under the threshold."""
    deadline = time.monotonic() + max_wait
    other = math.nan
    for _ in range(int(max_wait) + 1):
        mine = own_cpu_seconds() + sum(cpu_seconds(pid) for pid in pids)
        busy, started = system_busy_seconds(), time.monotonic()
        await asyncio.sleep(1.0)
        mine = own_cpu_seconds() + sum(cpu_seconds(pid) for pid in pids) - mine
        wall = time.monotonic() - started
        other = max(0.0, system_busy_seconds() - busy - mine) / wall * 100
        if other < threshold_pct or time.monotonic() >= deadline:
            break
    return other


def own_cpu_seconds() -> float:
    """CPU time of this process, all threads."""
    return time.process_time()


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it).

    Returns the soft limit in force afterwards; it cannot pass the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# -- statistics and tables -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        parts = [row[0].ljust(widths[0]), *rest]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rounded(value: float, digits: int = 3) -> float | None:
    """For JSON output: NaN becomes null."""
    return None if math.isnan(value) else round(value, digits)


# -- configs ---------------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh Standard Webhooks secret, `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Drive:
    name: str
    resource: str
    webhook: str


def write_config(
    folder: Path,
    *,
    graph_url: str,
    webhooks: Mapping[str, str],
    drives: Sequence[Drive],
    secret: str | None,
    concurrency: int,
    log_level: str = "info",
    ca_file: Path | None = None,
) -> Path:
    """A relayd config in `folder` (state, token and log beside it); returns its path.

    Admin server off (no port to collide with); JSON logs at `log_level`, as in production.
    `ca_file`: the test CA of an emulator over TLS, as `tls.ca_file`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    token_file = folder / "token"
    token_file.write_text(TOKEN)
    hooks: dict[str, Any] = {}
    for name, url in webhooks.items():
        hook: dict[str, Any] = {"url": url, "concurrency": concurrency, "timeout": 15}
        if secret is not None:
            hook["secret"] = secret
        hooks[name] = hook
    document = {
        # The emulator is no tenant to protect: a budget far above what the run asks for, so
        # the figures measure relayd, not graph.requests_per_minute (docs/throttling.md).
        "graph": {"base_url": graph_url, "requests_per_minute": 1_000_000},
        "state_dir": str(folder / "state"),
        "admin": {"listen": ""},
        "log": {"level": log_level, "format": "json"},
        "accounts": {"bench": {"token_file": str(token_file)}},
        "webhooks": hooks,
        "drives": [
            {"name": d.name, "account": "bench", "resource": d.resource, "webhook": d.webhook}
            for d in drives
        ],
    }
    if ca_file is not None:
        document["tls"] = {"ca_file": str(ca_file)}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def relay_command(
    config: Path, *, memory: bool = False, uvloop: bool = False, extra: Sequence[str] = ()
) -> list[str]:
    """argv of a relay: the real `python -m relayd run`, or benchmarks/relay_runner.py with the
    store bypassed (`memory`), on uvloop, and/or with other runner options (`extra`)."""
    if not (memory or uvloop or extra):
        return [sys.executable, "-m", "relayd", "run", "--config", str(config)]
    argv = [sys.executable, str(HERE / "relay_runner.py"), *extra]
    argv += ["--memory"] if memory else []
    argv += ["--uvloop"] if uvloop else []
    return [*argv, "--config", str(config)]


LOOPS = ("default", "asyncio", "uvloop")


def loop_env(loop: str) -> dict[str, str] | None:
    """A relay child's environment for a `--loop` choice: "default" leaves the daemon's own
    (uvloop where installed, relayd.eventloop), the others set RELAYD_EVENT_LOOP."""
    if loop == "default":
        return None
    return {**os.environ, "RELAYD_EVENT_LOOP": loop}


def loop_name(loop: str) -> str:
    """What a `--loop` choice runs on in this environment, for the report."""
    from relayd.eventloop import choose

    if loop != "default":
        return loop
    return choose(os.environ.get("RELAYD_EVENT_LOOP"), uvloop_installed=_has("uvloop"))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def replace(module: ModuleType, name: str, value: object) -> None:
    """Put `value` in place of a module's global `name`: how the benchmarks swap relayd's parts
    (the store opener, the SQLite store's executor) without a hook in relayd for it."""
    if not hasattr(module, name):
        raise AttributeError(f"{module.__name__} has no {name} to replace: relayd changed")
    setattr(module, name, value)


def notification_seq(body: bytes) -> int:
    """The emulator's sequence number in a delivered body: relayd's envelope or a bare item."""
    document = json.loads(body)
    if "data" in document:
        document = document["data"]["notification"]
    return int(document["relaydEmulatorSeq"])


# -- child processes -------------------------------------------------------------------------------


class ExitWatch:
    """When a child process exits, seen from a thread that polls /proc/PID/stat every 10 ms
    (zombie or gone), so that a busy event loop in this process does not delay the figure."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._started = 0.0
        self._exited: float | None = None
        self._thread = threading.Thread(target=self._poll, name=f"exit-watch-{pid}", daemon=True)

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def _poll(self) -> None:
        stat = Path(f"/proc/{self._pid}/stat")
        while True:
            try:
                state = stat.read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("Z", "X", "gone"):
                self._exited = time.monotonic()
                return
            time.sleep(0.01)

    def seconds(self) -> float | None:
        """Seconds from start() to the exit; None if not seen yet."""
        self._thread.join(timeout=1.0)
        return None if self._exited is None else self._exited - self._started


class Child:
    """A child process that is always cleaned up: SIGTERM, then SIGKILL after a grace period.

    `async with Child(argv, log) as child:` starts it; leaving the block (normally or by an
    exception) stops it. stderr goes to `log` (read back with `tail()` when something fails);
    stdout is a pipe when `stdout=True` (JSON lines, read with `read_json()`).
    """

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        stdout: bool = False,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        self.argv = list(argv)
        self.log = log
        self._want_stdout = stdout
        self._env = dict(env) if env is not None else None
        self.stop_timeout = stop_timeout
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None  # SIGTERM to exit, set by stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def __aenter__(self) -> Child:
        return await self.start()

    async def start(self) -> Child:
        """Start the process: what `async with` does on entry, for a caller that ends it itself
        (with `stop()` or `kill()`), such as one that restarts a child many times."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.started_at = time.monotonic()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if self._want_stdout else asyncio.subprocess.DEVNULL,
                stderr=log_fd,
                env=self._env,
            )
        finally:
            os.close(log_fd)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            await self.kill()
        else:
            await self.stop()

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def check_alive(self, what: str) -> None:
        if not self.alive():
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"{what} exited (code {code}) early:\n{self.tail()}")

    async def stop(self) -> int | None:
        """SIGTERM; SIGKILL if it has not exited within stop_timeout. Returns the exit code.

        `stop_seconds` is then how long it took to exit, timed by a thread that watches
        /proc: this process's event loop (busy with an emulator serving thousands of sockets)
        can notice the exit many seconds late."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            watch = ExitWatch(process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            watch.start()
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout)
            except TimeoutError:
                await self.kill()
            self.stop_seconds = watch.seconds()
        self.exit_code = process.returncode
        return self.exit_code

    async def kill(self) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
        self.exit_code = process.returncode

    async def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the child writes on stdout."""
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        for _ in range(1000):  # skips stray non-JSON lines, a bounded number of them
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), remaining)
            except TimeoutError:
                break
            if not line:
                raise RuntimeError(f"{self.argv[1]} closed its stdout:\n{self.tail()}")
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
        raise TimeoutError(f"no JSON line from {self.argv[1]} within {timeout:g}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


async def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.01,
    alive: Child | None = None,
) -> float:
    """Poll `condition` until true; returns the time.monotonic() when it was seen true.

    Fails after `timeout` seconds, or as soon as `alive` (a child the condition depends on) dies.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if alive is not None:
            alive.check_alive(what)
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class PathCounter:
    """Counts what a WebhookReceiver gets per path, through its `on_request` callback (O(1) per
    request, so the harness pays nothing that grows with the run)."""

    counts: dict[str, int] = field(default_factory=dict)
    arrivals: dict[str, list[tuple[float, bytes]]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_request(self, request: Any) -> None:
        name = request.name
        self.counts[name] = self.counts.get(name, 0) + 1
        self.arrivals.setdefault(name, []).append((request.at, request.body))
        self._changed.set()

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    async def wait(
        self, name: str, target: int, *, timeout: float, alive: Child | None = None
    ) -> bool:
        """Wait until `target` requests have arrived on the path; False after `timeout` seconds.

        Raises as soon as `alive` (the child that sends them) has died.
        """
        deadline = time.monotonic() + timeout
        while self.count(name) < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if alive is not None:
                alive.check_alive(f"waiting for {target} requests on /{name}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))
        return True


def print_json(document: Mapping[str, Any]) -> None:
    print(json.dumps(document, indent=None, sort_keys=False))
