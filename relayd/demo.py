"""`relayd demo`: the whole flow on one machine, no Microsoft account needed.

Starts the Graph emulator, a webhook receiver that prints what it gets, and the relay between them,
then has the emulator emit a notification every `interval` seconds.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from relayd.cli import serve
from relayd.config import parse_config
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ReceivedRequest
from relayd.signing import decode_secret, verify
from relayd.waiting import wait_event

DEMO_TOKEN = "demo-token"
DEMO_SECRET = "whsec_ZGVtby1zZWNyZXQtZm9yLXJlbGF5ZC1kZW1vLW9ubHk="


def _print_delivery(request: ReceivedRequest) -> None:
    """Print what arrived, with the signature checked the way a receiver checks it."""
    body = request.json()
    item = body.get("data", {}).get("notification", {})
    problem = verify(decode_secret(DEMO_SECRET), request.headers, request.body, now=time.time())
    print(
        f"webhook received {body.get('type')} #{item.get('relaydEmulatorSeq')} for drive"
        f" {body.get('data', {}).get('drive')!r}  webhook-id={request.headers.get('webhook-id')}"
        f" signature={'verified' if problem is None else 'INVALID (' + problem + ')'}",
        flush=True,
    )


async def run_demo(*, count: int = 0, interval: float = 1.0) -> int:
    """Run until Ctrl-C, or until `count` notifications have reached the receiver."""
    with tempfile.TemporaryDirectory(prefix="relayd-demo-") as scratch:
        folder = Path(scratch)
        (folder / "token").write_text(DEMO_TOKEN)
        async with (
            GraphEmulator(tokens=[DEMO_TOKEN], lifetime=60) as graph,
            WebhookReceiver(on_request=_print_delivery) as receiver,
        ):
            config = parse_config(
                f"""
graph: {{base_url: "{graph.base_url}"}}
state_dir: state
admin: {{listen: ""}}
log: {{level: info, format: console}}
accounts:
  demo: {{token_file: token}}
webhooks:
  receiver:
    url: "{receiver.url("hook")}"
    secret: {DEMO_SECRET}
    retry: {{initial_delay: 1s, max_delay: 10s}}
drives:
  - {{name: demo-drive, account: demo, resource: me, webhook: receiver}}
""",
                filename="demo-config.yaml",
                env={},
                base_dir=folder,
            )
            print(
                f"Graph emulator at {graph.base_url}, webhook receiver at {receiver.url('hook')}."
                " Ctrl-C stops the demo.",
                flush=True,
            )
            shutdown = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                group.create_task(serve(config, shutdown))
                group.create_task(_emit(graph, receiver, shutdown, count, interval))
    return 0


async def _emit(
    graph: GraphEmulator,
    receiver: WebhookReceiver,
    shutdown: asyncio.Event,
    count: int,
    interval: float,
) -> None:
    """Emit one notification per interval once the relay is connected; stop after `count`."""
    emitted = 0
    while not shutdown.is_set():
        if graph.connected("me") and not (count and emitted >= count):
            await graph.emit("me")
            emitted += 1
        if count and len(receiver.delivered("hook")) >= count:
            shutdown.set()
            return
        await wait_event(shutdown, interval)
