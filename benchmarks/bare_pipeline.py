"""The least a relay can do: socket in, POST out, nothing stored, nothing signed.

One python-socketio AsyncClient (websocket transport; the notificationUrl's path is the namespace
and its query is passed through unchanged, as docs/graph-socketio.md describes) whose
`notification` handler parses the JSON string and queues each item; `--concurrency` workers POST
the items with one shared aiohttp session. It is the yardstick the relay is compared with in
`benchmarks/throughput.py`, and is also used there, in two other modes, to measure the harness:

    bare_pipeline.py --endpoint URL --hook URL [--concurrency 8]   the bare pipeline
    bare_pipeline.py --endpoint URL --null --expect N              read and count only: emit rate
    bare_pipeline.py --hook URL --load N [--concurrency 8]         POST N items only: receiver rate

It writes JSON lines on stdout: {"event": "ready"} once connected, {"event": "done", ...} when a
`--null` or `--load` run has finished. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import socketio

from relayd import eventloop

TOKEN = "bench-token"


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def socket_target(notification_url: str) -> tuple[str, str]:
    """(Engine.IO server URL with the query, Socket.IO namespace) of a notificationUrl."""
    parts = urlsplit(notification_url)
    namespace = parts.path.rstrip("/")
    if namespace.endswith("/callback"):
        namespace = namespace[: -len("/callback")]
    url = f"{parts.scheme}://{parts.netloc}"
    if parts.query:
        url += f"?{parts.query}"
    return url, namespace


class Poster:
    """`concurrency` workers POSTing queued JSON documents with one session."""

    def __init__(self, session: aiohttp.ClientSession, url: str, concurrency: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent = 0
        self.errors = 0
        self._session = session
        self._url = url
        self._workers = [asyncio.create_task(self._work()) for _ in range(concurrency)]

    async def _work(self) -> None:
        headers = {"content-type": "application/json"}
        while True:
            body = await self.queue.get()
            try:
                async with self._session.post(self._url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status >= 300:
                        self.errors += 1
                self.sent += 1
            except aiohttp.ClientError:
                self.errors += 1
            finally:
                self.queue.task_done()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


async def fetch_endpoint(session: aiohttp.ClientSession, endpoint: str) -> str:
    async with session.get(endpoint, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        response.raise_for_status()
        document = await response.json(content_type=None)
    return str(document["notificationUrl"])


async def load(args: argparse.Namespace, session: aiohttp.ClientSession) -> None:
    """POST `--load` synthetic items as fast as `--concurrency` workers can."""
    poster = Poster(session, args.hook, args.concurrency)
    try:
        item = {"resource": "bench", "relaydEmulatorSeq": 0}
        started = time.monotonic()
        for seq in range(1, args.load + 1):
            item["relaydEmulatorSeq"] = seq
            poster.queue.put_nowait(json.dumps(item).encode())
        await asyncio.wait_for(poster.queue.join(), args.max_seconds)
        say(
            event="done",
            count=poster.sent,
            errors=poster.errors,
            start=started,
            end=time.monotonic(),
        )
    finally:
        await poster.close()


async def relay(
    args: argparse.Namespace, session: aiohttp.ClientSession, stop: asyncio.Event
) -> None:
    """The bare pipeline (or, with --null, a consumer that only counts)."""
    url, namespace = socket_target(await fetch_endpoint(session, args.endpoint))
    poster = None if args.null else Poster(session, args.hook, args.concurrency)
    client = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    seen = 0

    async def on_notification(payload: str, *_: object) -> None:
        nonlocal seen
        items = json.loads(payload)["value"]
        seen += len(items)
        if poster is not None:
            for item in items:
                poster.queue.put_nowait(json.dumps(item).encode())
        elif seen == args.expect:
            say(event="done", count=seen, last=time.monotonic())

    client.on("notification", on_notification, namespace=namespace)
    client.on("disconnect", lambda *_: stop.set(), namespace=namespace)
    await client.connect(
        url,
        namespaces=[namespace],
        transports=["websocket"],
        socketio_path="socket.io",
        wait_timeout=15,
    )
    say(event="ready")
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.max_seconds)
    finally:
        await client.disconnect()
        if poster is not None:
            await poster.close()


async def amain(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        if args.load:
            await load(args, session)
        else:
            await relay(args, session, stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="Graph socketIo endpoint URL (GET with the token)")
    parser.add_argument("--hook", help="webhook URL to POST items to")
    parser.add_argument("--concurrency", type=int, default=8, help="POSTs in flight (default 8)")
    parser.add_argument("--null", action="store_true", help="count notifications, POST nothing")
    parser.add_argument(
        "--expect", type=int, default=0, help="with --null: say done after this many"
    )
    parser.add_argument("--load", type=int, default=0, help="POST this many items, no socket")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="run at most this long")
    args = parser.parse_args(argv)
    if args.load and not args.hook:
        parser.error("--load needs --hook")
    if not args.load and (not args.endpoint or not (args.null or args.hook)):
        parser.error("give --endpoint and --hook (or --null)")
    # The same loop as the daemon's (uvloop where installed; RELAYD_EVENT_LOOP): a fair baseline.
    return eventloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
