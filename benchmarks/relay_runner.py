"""`relayd run` with benchmark-only substitutions, in its own process.

    python benchmarks/relay_runner.py [--memory] [--uvloop | --asyncio] --config CONFIG

--memory   the store bypassed: `benchmarks/memory_outbox.MemoryOutbox` replaces the SQLite outbox
           (patched in as `relayd.supervisor.open_store`, the name the supervisor opens it by).
--uvloop   uvloop's event loop (RELAYD_EVENT_LOOP=uvloop; the daemon's default where installed).
--asyncio  asyncio's own event loop (RELAYD_EVENT_LOOP=asyncio), to compare.
--gc-stats write the garbage collector's cumulative time per generation to stderr every 10 s, as
           a JSON line {"gc": {"0": [collections, seconds], ...}, "at": monotonic} (experiment).
--gc-freeze SECONDS  gc.freeze() that long after start, moving everything alive then (the drives'
           connections, once started) out of the collector's reach (experiment).

Everything else is exactly `python -m relayd run --config CONFIG`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from typing import Any

import relayd.supervisor
from relayd import eventloop
from relayd.cli import main as relayd_main


class GcStats:
    """Time spent in each generation's collections, via gc.callbacks."""

    def __init__(self) -> None:
        self.totals: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            total = self.totals[int(info["generation"])]
            total[0] += 1
            total[1] += time.perf_counter() - self._started

    def report_every(self, seconds: float) -> None:
        def loop() -> None:
            while True:  # a daemon thread: ends with the process
                time.sleep(seconds)
                line = {"gc": {str(g): [int(c), round(s, 4)] for g, (c, s) in self.totals.items()}}
                line["at"] = time.monotonic()  # type: ignore[assignment]
                print(json.dumps(line), file=sys.stderr, flush=True)

        threading.Thread(target=loop, name="gc-stats", daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="in-memory outbox, no SQLite")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--asyncio", action="store_true", help="run on asyncio's own loop")
    parser.add_argument("--gc-stats", action="store_true", help="report GC time every 10 s")
    parser.add_argument("--gc-freeze", type=float, default=None, help="gc.freeze() after SECONDS")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    if args.gc_stats:
        GcStats().report_every(10.0)
    if args.gc_freeze is not None:
        timer = threading.Timer(args.gc_freeze, gc.freeze)
        timer.daemon = True
        timer.start()
    if args.memory:
        from benchkit import replace
        from memory_outbox import open_memory_store

        replace(relayd.supervisor, "open_store", open_memory_store)
    if args.uvloop or args.asyncio:
        # The daemon picks its loop itself (relayd.eventloop): tell it which.
        os.environ[eventloop.ENV] = "uvloop" if args.uvloop else "asyncio"
    return int(relayd_main(["run", "--config", args.config]))


if __name__ == "__main__":
    sys.exit(main())
