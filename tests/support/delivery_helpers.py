"""Helpers for the delivery tests: configs written to disk, async polling, secrets, the CLI."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import yaml

from relayd import cli
from relayd.config import Config, load_config
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.store import Filter, State, Store
from support.configs import relay_document


def new_secret() -> str:
    """A fresh Standard Webhooks secret: 32 random bytes, base64, `whsec_` prefix."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def write_config(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    *,
    webhooks: dict[str, dict[str, Any]] | None = None,
    drives: list[dict[str, Any]] | None = None,
    **top: Any,
) -> tuple[Path, Config]:
    """Write a config file for the emulator and receiver (as `relayd --config` reads it) and
    load it: the daemon in-process and a CLI command then share one state_dir."""
    document = relay_document(tmp_path, emulator, receiver, drives=drives, webhooks=webhooks, **top)
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(document))
    return path, load_config(path, env={})


async def count(outbox: Store, webhook: str, state: State) -> int:
    summary = await outbox.summary(Filter(webhook=webhook))
    return summary.counts.get((webhook, state), 0)


async def run_cli(*argv: str) -> int:
    """`relayd ARGV...` in-process. In a thread: the command runs its own event loop, beside the
    daemon's, as a second process would."""
    return await asyncio.to_thread(cli.main, list(argv))
