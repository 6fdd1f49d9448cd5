"""The Graph emulator and a webhook receiver in a process of their own, driven over HTTP.

    python benchmarks/harness.py

For benchmarks that run the relay in their own process (benchmarks/profile_notification.py), so
that the emulator's and the receiver's work stays out of the relay's profile. It prints one JSON
line, {"graph": GRAPH_BASE_URL, "hook": WEBHOOK_URL, "control": CONTROL_URL}, and serves:

    GET  CONTROL/connected?resource=R            {"connected": live sockets of drive R}
    POST CONTROL/burst?resource=R&count=N        emit N notifications as fast as the emulator can,
                                                 answer once the receiver has all N (or after
                                                 `timeout` seconds, default 120):
                                                 {"received", "first_emit", "last_emit", "last"}

Times are time.monotonic() (CLOCK_MONOTONIC: comparable across processes). SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time

from aiohttp import web
from benchkit import TOKEN, PathCounter

from relayd.emulator import GraphEmulator, WebhookReceiver

YIELD_EVERY = 32
HOOK = "hook"


class Harness:
    def __init__(self, emulator: GraphEmulator, counter: PathCounter) -> None:
        self.emulator = emulator
        self.counter = counter

    async def connected(self, request: web.Request) -> web.Response:
        return web.json_response({"connected": self.emulator.connected(request.query["resource"])})

    async def burst(self, request: web.Request) -> web.Response:
        resource = request.query["resource"]
        count = int(request.query["count"])
        timeout = float(request.query.get("timeout", "120"))
        base = self.counter.count(HOOK)
        first = time.monotonic()
        for index in range(count):
            await self.emulator.emit(resource)
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
        emitted = time.monotonic()
        await self.counter.wait(HOOK, base + count, timeout=timeout)
        arrivals = self.counter.arrivals.get(HOOK, [])[base:]
        return web.json_response(
            {
                "received": len(arrivals),
                "first_emit": first,
                "last_emit": emitted,
                "last": max((at for at, _ in arrivals), default=emitted),
            }
        )


async def serve(max_seconds: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    counter = PathCounter()
    async with (
        GraphEmulator(tokens=[TOKEN]) as emulator,
        WebhookReceiver(on_request=counter.on_request) as receiver,
    ):
        harness = Harness(emulator, counter)
        app = web.Application()
        app.router.add_get("/connected", harness.connected)
        app.router.add_post("/burst", harness.burst)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            print(
                json.dumps(
                    {
                        "graph": emulator.base_url,
                        "hook": receiver.url(HOOK),
                        "control": f"http://127.0.0.1:{port}",
                    }
                ),
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max_seconds)
        finally:
            await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="run at most this long")
    asyncio.run(serve(parser.parse_args().max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
