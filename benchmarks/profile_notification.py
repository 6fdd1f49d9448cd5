"""Where the relay's CPU goes, per notification: the relay in this process under cProfile.

    python benchmarks/profile_notification.py [--burst 5000] [--memory] [--top 20] [--json]

The Graph emulator and the webhook receiver run in a child (benchmarks/harness.py), so only the
relay is in this process: the real Supervisor, SQLite outbox (or, with --memory, the in-memory
stand-in) and signing, with production logging (JSON, info) written to /dev/null.

After a warm-up, one burst runs without the profiler (this process's CPU time / N: the honest
cost) and one with it. The profile covers the event loop's thread and the outbox's writer thread
(each operation the outbox hands to its thread is run under a per-thread profiler). Times are
wall-clock microseconds per notification as cProfile measures them: inflated by the profiler's own
overhead, and including waits inside calls (fsync in a COMMIT; epoll when the loop is idle), so
read them as shares and ranks; the unprofiled figure is the absolute cost.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from benchkit import (
    HERE,
    Child,
    Drive,
    machine,
    machine_line,
    new_secret,
    print_json,
    raise_nofile,
    replace,
    table,
    write_config,
)

import relayd.store.sqlite
import relayd.supervisor
from relayd import logs
from relayd.config import load_config
from relayd.supervisor import Supervisor

T = TypeVar("T")
RESOURCE = "drives/bench-profile"
FuncKey = tuple[str, int, str]


class ThreadProfiles:
    """Per-thread profilers for work handed to the outbox's executor, on while `on` is set."""

    def __init__(self) -> None:
        self.on = False
        self.profiles: dict[int, cProfile.Profile] = {}
        self._lock = threading.Lock()

    def wrap(self, function: Callable[..., T]) -> Callable[..., T]:
        def call(*args: Any, **kwargs: Any) -> T:
            if not self.on:
                return function(*args, **kwargs)
            with self._lock:
                profile = self.profiles.setdefault(threading.get_ident(), cProfile.Profile())
            profile.enable()
            try:
                return function(*args, **kwargs)
            finally:
                profile.disable()

        return call


THREADS = ThreadProfiles()


class ProfiledExecutor(ThreadPoolExecutor):
    """relayd.store.sqlite's ThreadPoolExecutor, each submitted call run under THREADS' profiler."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(THREADS.wrap(fn), *args, **kwargs)


# -- reading the profile ---------------------------------------------------------------------


def short(key: FuncKey) -> str:
    """`relayd/watcher.py:330(on_event)`, `aiohttp/client.py:...`, `{method 'execute' ...}`."""
    filename, line, name = key
    if filename == "~":
        return name
    path = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = path.split("/", 1)[1]
            break
    else:
        for package in ("relayd", "benchmarks"):
            if f"/{package}/" in path:
                path = f"{package}/" + path.rsplit(f"/{package}/", 1)[1]
                break
    return f"{path}:{line}({name})"


def area(key: FuncKey) -> str:
    """The package (or, for builtins, the kind of work) a function belongs to."""
    filename, _, name = key
    if filename == "~":
        for marker, label in (
            ("sqlite3", "sqlite3 (C)"),
            ("epoll", "event loop wait (epoll)"),
            ("_socket", "socket syscalls"),
            ("_hashlib", "hmac/sha256 (C)"),
            ("hmac", "hmac/sha256 (C)"),
            ("json", "json (C)"),
            ("_asyncio", "asyncio (C)"),
            ("_thread", "thread locks"),
            ("lock", "thread locks"),
        ):
            if marker in name:
                return label
        return "other builtins"
    path = filename.replace("\\", "/")
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0]
    if "/relayd/" in path:
        return "relayd." + path.rsplit("/relayd/", 1)[1].removesuffix(".py").replace("/", ".")
    if "/benchmarks/" in path:
        return "benchmarks." + path.rsplit("/benchmarks/", 1)[1].removesuffix(".py")
    if "/lib/python3." in path:
        rest = path.split("/lib/python3.", 1)[1].split("/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    return path


def stats_rows(stats: dict[FuncKey, Any], n: int) -> list[dict[str, Any]]:
    rows = []
    for key, (_cc, calls, tottime, cumtime, _callers) in stats.items():
        rows.append(
            {
                "function": short(key),
                "area": area(key),
                "calls_per_notification": calls / n,
                "tottime_us": tottime / n * 1e6,
                "cumtime_us": cumtime / n * 1e6,
            }
        )
    return rows


# -- the run ---------------------------------------------------------------------------------


async def burst(session: aiohttp.ClientSession, control: str, count: int) -> dict[str, Any]:
    params = {"resource": RESOURCE, "count": str(count), "timeout": str(60 + count / 50)}
    async with session.post(f"{control}/burst", params=params) as response:
        response.raise_for_status()
        result: dict[str, Any] = await response.json()
    if result["received"] < count:
        raise RuntimeError(f"only {result['received']} of {count} notifications arrived")
    return result


async def wait_connected(session: aiohttp.ClientSession, control: str, task: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if task.done():
            task.result()
            raise RuntimeError("the relay stopped before it connected")
        async with session.get(f"{control}/connected", params={"resource": RESOURCE}) as answer:
            if (await answer.json())["connected"] >= 1:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError("the relay did not connect within 30 s")


async def profile(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    log = open(os.devnull, "w")  # noqa: SIM115, ASYNC230 - production logging, thrown away
    logs.configure("info", "json", stream=log)
    harness_argv = [sys.executable, str(HERE / "harness.py")]
    main_profile = cProfile.Profile()
    async with (
        Child(harness_argv, workdir / "harness.log", stdout=True) as harness,
        aiohttp.ClientSession() as session,
    ):
        where = await harness.read_json(30)
        control = str(where["control"])
        config = write_config(
            workdir / "relay",
            graph_url=str(where["graph"]),
            webhooks={"bench": str(where["hook"])},
            drives=[Drive(name="bench", resource=RESOURCE, webhook="bench")],
            secret=new_secret(),
            concurrency=args.concurrency,
        )
        supervisor = Supervisor(load_config(config))
        shutdown = asyncio.Event()
        task = asyncio.create_task(supervisor.run(shutdown))
        try:
            await wait_connected(session, control, task)
            if args.warmup:
                await burst(session, control, args.warmup)
            cpu = time.process_time()
            plain = await burst(session, control, args.burst)
            cpu = time.process_time() - cpu
            THREADS.on = True
            main_profile.enable()
            profiled = await burst(session, control, args.burst)
            main_profile.disable()
            THREADS.on = False
        finally:
            shutdown.set()
            try:
                await asyncio.wait_for(task, 30)
            finally:
                log.close()
    return summarize(args, main_profile, cpu, plain, profiled)


def summarize(
    args: argparse.Namespace,
    main_profile: cProfile.Profile,
    cpu: float,
    plain: dict[str, Any],
    profiled: dict[str, Any],
) -> dict[str, Any]:
    n = args.burst
    stats = pstats.Stats(main_profile)
    thread_total = 0.0
    for thread_profile in THREADS.profiles.values():
        thread_stats = pstats.Stats(thread_profile)
        thread_total += sum(v[2] for v in thread_stats.stats.values())  # type: ignore[attr-defined]
        stats.add(thread_stats)
    raw: dict[FuncKey, Any] = stats.stats  # type: ignore[attr-defined]
    rows = stats_rows(raw, n)
    by_area: dict[str, float] = {}
    for row in rows:
        by_area[row["area"]] = by_area.get(row["area"], 0.0) + row["tottime_us"]
    total = sum(by_area.values())
    top = args.top
    relayd_rows = [r for r in rows if r["function"].startswith("relayd/")]
    return {
        "benchmark": "profile_notification",
        "machine": machine(),
        "settings": {
            "burst": n,
            "warmup": args.warmup,
            "store": "memory" if args.memory else "sqlite",
            "concurrency": args.concurrency,
            "signing": True,
        },
        "unprofiled": {
            "cpu_us_per_notification": round(cpu / n * 1e6, 1),
            "notifications_per_s": round(n / (plain["last"] - plain["first_emit"]), 1),
        },
        "profiled": {
            "notifications_per_s": round(n / (profiled["last"] - profiled["first_emit"]), 1),
            "total_us_per_notification": round(total, 1),
            "outbox_thread_us_per_notification": round(thread_total / n * 1e6, 1),
        },
        "by_area": [
            {"area": name, "tottime_us": round(us, 1), "share": round(us / total, 3)}
            for name, us in sorted(by_area.items(), key=lambda kv: -kv[1])
        ],
        "top_tottime": _rounded(sorted(rows, key=lambda r: -r["tottime_us"])[:top]),
        "top_cumtime": _rounded(sorted(rows, key=lambda r: -r["cumtime_us"])[:top]),
        "top_relayd_cumtime": _rounded(sorted(relayd_rows, key=lambda r: -r["cumtime_us"])[:top]),
    }


def _rounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in rows
    ]


def render(document: dict[str, Any]) -> str:
    settings = document["settings"]
    plain = document["unprofiled"]
    profiled = document["profiled"]
    lines = [
        f"machine: {machine_line(document['machine'])}",
        f"relay in-process, store {settings['store']}, signing on, burst N={settings['burst']},"
        f" webhook concurrency {settings['concurrency']}",
        f"unprofiled: {plain['cpu_us_per_notification']:,.0f} us CPU per notification"
        f" (this process, all threads), {plain['notifications_per_s']:,.0f} notifications/s",
        f"profiled:   {profiled['total_us_per_notification']:,.0f} us per notification in the"
        f" profile ({profiled['outbox_thread_us_per_notification']:,.0f} of it in the outbox"
        f" thread), {profiled['notifications_per_s']:,.0f} notifications/s under the profiler",
        "",
        "time by area (tottime, us per notification):",
        table(
            ["area", "us/notif", "share"],
            [[a["area"], a["tottime_us"], f"{a['share']:.1%}"] for a in document["by_area"][:15]],
        ),
    ]
    for key, title, column in (
        ("top_tottime", "top functions by own time (tottime)", "tottime_us"),
        ("top_cumtime", "top functions by cumulative time", "cumtime_us"),
        ("top_relayd_cumtime", "relayd's own functions by cumulative time", "cumtime_us"),
    ):
        lines += ["", f"{title}, us per notification:"]
        lines.append(
            table(
                ["function", "us/notif", "calls/notif"],
                [[r["function"], r[column], r["calls_per_notification"]] for r in document[key]],
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=5000, help="notifications per burst")
    parser.add_argument("--warmup", type=int, default=500, help="burst before measuring")
    parser.add_argument("--memory", action="store_true", help="in-memory outbox (store bypassed)")
    parser.add_argument("--concurrency", type=int, default=8, help="webhook concurrency")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    raise_nofile(4096)
    replace(relayd.store.sqlite, "ThreadPoolExecutor", ProfiledExecutor)
    if args.memory:
        from memory_outbox import open_memory_store

        replace(relayd.supervisor, "open_store", open_memory_store)
    with tempfile.TemporaryDirectory(prefix="relayd-profile-") as tmp:
        document = asyncio.run(profile(args, Path(tmp)))
    if args.json:
        print_json(document)
    else:
        print(render(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
