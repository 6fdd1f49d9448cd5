"""The relayd config every test starts from: the emulator's drive `me`, relayed to the receiver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relayd.emulator import GraphEmulator, WebhookReceiver

TOKEN = "test-token"  # what the emulator fixture accepts (tests/conftest.py)
FAST_RETRY = {"initial_delay": 0.05, "max_delay": 0.5}
# The store every config built here uses: support.stores.store_backend sets the URL for a test
# that runs on PostgreSQL (None: SQLite in state_dir).
STORE: dict[str, str | None] = {"url": None}


def relay_document(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    *,
    drives: list[dict[str, Any]] | None = None,
    webhooks: dict[str, dict[str, Any]] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """The config as YAML would hold it; fast retries unless a test says otherwise.

    The token file is written once per test folder: a test may change it and build again.
    """
    token_file = tmp_path / "token"
    if not token_file.exists():
        token_file.write_text(TOKEN)
    return {
        "graph": {"base_url": emulator.base_url},
        "state_dir": str(tmp_path / "state"),
        "admin": {"listen": ""},
        # Small, so that every test's state_dir does not write the default 16 MiB of zeros.
        "outbox": {"disk_reserve": "1MiB"},
        **({"store": {"url": STORE["url"]}} if STORE["url"] is not None else {}),
        "accounts": {"test": {"token_file": str(token_file)}},
        "webhooks": webhooks or {"hook": {"url": receiver.url("hook"), "retry": FAST_RETRY}},
        "drives": drives
        or [{"name": "d1", "account": "test", "resource": "me", "webhook": "hook"}],
        **top,
    }
