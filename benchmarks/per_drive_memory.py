"""Where a drive's memory goes: Python objects and allocation sites per drive, against RSS.

    python benchmarks/per_drive_memory.py [--drives 500] [--tls] [--uvloop] [--no-tracemalloc]

One relay child (`python -m relayd run`, through this file's `--child` mode) watching N drives of
a Graph emulator in this process (with `--tls`: https/wss and a throwaway CA, as
`many_drives.py --tls`), and the same relay with 0 drives. Once every drive has connected and
`--settle` seconds have passed, the child is sent SIGUSR1 and writes, from its event loop's
thread: RSS, a count of live objects by type (gc.get_objects(), plus asyncio tasks by their
coroutine's name), and, unless `--no-tracemalloc`, a tracemalloc snapshot grouped by source line.
Printed per drive: (N drives - 0 drives) / N for each. RSS beyond what tracemalloc traces is
memory allocated outside Python's allocator (OpenSSL's per-connection state, libuv's buffers).

tracemalloc slows start-up and adds its own overhead to RSS: read its RSS with the objects and
lines, and take RSS per drive from many_drives.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from benchkit import Child, cpu_seconds, raise_nofile, rss_kib
from many_drives import Tls, emulator_for, idle_drives_config, start_up

from relayd.emulator.tls import throwaway_ca

HERE = Path(__file__).resolve().parent
THIS = str(HERE / "per_drive_memory.py")


# ---- child: the relay, with a SIGUSR1 report --------------------------------------------------


def task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    if code is None:
        return type(coro).__name__
    return f"{code.co_qualname} ({Path(code.co_filename).name})"


def report(out: Path, traced: bool) -> None:
    gc.collect()
    types: collections.Counter[str] = collections.Counter()
    tasks: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        cls = type(obj)
        types[f"{cls.__module__}.{cls.__qualname__}"] += 1
        if isinstance(obj, asyncio.Task) and not obj.done():
            tasks[task_name(obj)] += 1
    document: dict[str, Any] = {
        "rss_kib": rss_kib(os.getpid()),
        "types": dict(types),
        "tasks": dict(tasks),
    }
    if traced:
        snapshot = tracemalloc.take_snapshot()
        lines = collections.Counter[str]()
        for stat in snapshot.statistics("lineno"):
            frame = stat.traceback[0]
            lines[f"{frame.filename}:{frame.lineno}"] += stat.size
        document["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        document["lines"] = dict(lines)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.rename(out)


def child_main(args: argparse.Namespace) -> int:
    if args.trace:
        tracemalloc.start(1)
    # The daemon picks its loop itself (relayd.eventloop): tell it which.
    os.environ["RELAYD_EVENT_LOOP"] = "uvloop" if args.uvloop else "asyncio"

    def on_usr1(_signum: int, _frame: object) -> None:
        # Runs in the main thread (the event loop's) between bytecodes: nothing runs meanwhile.
        report(args.out, args.trace)

    signal.signal(signal.SIGUSR1, on_usr1)
    from relayd.cli import main as relayd_main

    return int(relayd_main(["run", "--config", str(args.config)]))


# ---- parent ----------------------------------------------------------------------------------


PING_INTERVAL = 25.0  # the emulator's default, as many_drives.py


def frame_name(frame: str) -> str:
    """py-spy's `function (path/to/file.py:line)`, the path shortened."""
    function, _, where = frame.partition(" (")
    return f"{function} ({short(where)}"


async def idle_profile(args: argparse.Namespace, pid: int, count: int, folder: Path) -> dict:
    """py-spy over `--py-spy` seconds of idling: CPU per ping exchange, and the functions the
    samples fall in (own time, and on the stack), as shares of the samples."""
    raw = folder / "py-spy.txt"
    cpu = cpu_seconds(pid)
    started = time.monotonic()
    spy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "py-spy"),
        *("record", "--pid", str(pid), "--duration", str(int(args.py_spy)), "--rate", "250"),
        *("--format", "raw", "--nonblocking", "--output", str(raw)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await spy.communicate()
    wall = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, n = line.rpartition(" ")
        frames = [frame_name(f) for f in stack.split(";")]
        total += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            inclusive[frame] += int(n)
    exchanges = count * wall / PING_INTERVAL
    return {
        "seconds": wall,
        "cpu_pct": cpu / wall * 100,
        "us_per_exchange": cpu / exchanges * 1e6,
        "samples": total,
        "py_spy_error": err.decode()[-500:] if spy.returncode else "",
        "own": [(k, v / max(total, 1)) for k, v in own.most_common(args.top)],
        "inclusive": [(k, v / max(total, 1)) for k, v in inclusive.most_common(args.top)],
    }


async def one(
    args: argparse.Namespace, workdir: Path, count: int, tls: Tls | None, profiles: dict
) -> dict:
    folder = workdir / f"d{count}"
    out = folder / "report.json"
    async with emulator_for(tls) as emulator:
        config = idle_drives_config(folder, emulator.base_url, count, tls)
        argv = [sys.executable, THIS, "--child", "--config", str(config)]
        argv += ["--out", str(out)]
        argv += ["--trace"] if args.tracemalloc else []
        argv += ["--uvloop"] if args.uvloop else []
        async with Child(argv, folder / "stderr.log", stop_timeout=60.0) as child:
            if count:
                seen, *_ = await start_up(child, emulator, count, 120.0 + count * 0.3)
                if seen != seen:  # NaN: not all connected
                    raise RuntimeError(f"not every drive connected: {child.tail()}")
            await asyncio.sleep(args.settle)
            if count and args.py_spy:
                profiles[count] = await idle_profile(args, child.pid, count, folder)
            os.kill(child.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 120
            while not out.exists():
                child.check_alive("the relay")
                if time.monotonic() > deadline:
                    raise RuntimeError("no report from the relay")
                await asyncio.sleep(0.2)
    return json.loads(out.read_text())


def per_drive(full: dict[str, int], base: dict[str, int], n: int) -> list[tuple[str, float]]:
    keys = set(full) | set(base)
    rows = [(k, (full.get(k, 0) - base.get(k, 0)) / n) for k in keys]
    return sorted(rows, key=lambda r: -r[1])


def short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/wt-perf/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(4 * args.drives + 256)
    with tempfile.TemporaryDirectory(prefix="relayd-mem-") as tmp:
        workdir = Path(tmp)
        tls = None
        if args.tls:
            authority = throwaway_ca()
            tls = Tls(authority, authority.write_ca(workdir / "test-ca.pem"))
        profiles: dict[int, dict] = {}
        base = await one(args, workdir, 0, tls, profiles)
        full = await one(args, workdir, args.drives, tls, profiles)
    n = args.drives
    result: dict[str, Any] = {
        "drives": n,
        "tls": args.tls,
        "uvloop": args.uvloop,
        "tracemalloc": args.tracemalloc,
        "rss_kib_per_drive": (full["rss_kib"] - base["rss_kib"]) / n,
        "objects_per_drive": sum(full["types"].values()) / n - sum(base["types"].values()) / n,
        "types": per_drive(full["types"], base["types"], n)[: args.top],
        "tasks": per_drive(full["tasks"], base["tasks"], n)[: args.top],
    }
    if profiles:
        result["idle_profile"] = profiles[n]
    if args.tracemalloc:
        result["traced_kib_per_drive"] = (full["traced_bytes"] - base["traced_bytes"]) / n / 1024
        lines = per_drive(full["lines"], base["lines"], n)[: args.top]
        result["lines_bytes"] = [(short(k), v) for k, v in lines]
    return result


def render(r: dict[str, Any]) -> str:
    mode = ("wss" if r["tls"] else "ws") + (", uvloop" if r["uvloop"] else ", asyncio")
    out = [
        f"{r['drives']} drives, {mode}, tracemalloc {'on' if r['tracemalloc'] else 'off'}",
        f"RSS per drive: {r['rss_kib_per_drive']:.1f} KiB"
        + (
            f"; traced by tracemalloc: {r['traced_kib_per_drive']:.1f} KiB"
            " (outside Python's allocator:"
            f" {r['rss_kib_per_drive'] - r['traced_kib_per_drive']:.1f})"
            if r["tracemalloc"]
            else ""
        ),
        f"gc-tracked objects per drive: {r['objects_per_drive']:.1f}",
        "",
        "live tasks per drive (by coroutine):",
        *[f"  {v:6.2f}  {k}" for k, v in r["tasks"] if abs(v) >= 0.01],
        "",
        "gc-tracked objects per drive, by type:",
        *[f"  {v:6.2f}  {k}" for k, v in r["types"] if abs(v) >= 0.5],
    ]
    if r["tracemalloc"]:
        out += ["", "bytes per drive by allocation site (tracemalloc, top):"]
        out += [f"  {v:9,.0f}  {k}" for k, v in r["lines_bytes"]]
    if "idle_profile" in r:
        p = r["idle_profile"]
        out += [
            "",
            f"idle, py-spy {p['seconds']:.0f} s, {p['samples']} samples:"
            f" relay CPU {p['cpu_pct']:.2f} %"
            f" of a core, {p['us_per_exchange']:.0f} us CPU per ping exchange (ping every 25 s)",
            *([p["py_spy_error"]] if p["py_spy_error"] else []),
            "share of samples, own time:",
            *[f"  {v:6.1%}  {k}" for k, v in p["own"]],
            "share of samples, on the stack:",
            *[f"  {v:6.1%}  {k}" for k, v in p["inclusive"]],
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drives", type=int, default=500)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--uvloop", action="store_true", help="the relay on uvloop")
    parser.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument(
        "--py-spy", type=float, default=0.0, metavar="SECONDS", help="profile the idle relay"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    # child mode (internal)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "main"
    sys.exit(main())
