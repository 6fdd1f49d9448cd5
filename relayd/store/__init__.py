"""Where notifications are kept between receipt and delivery: one interface, two backends.

`open_store` picks the backend from the config's `store.url`: none, SQLite in state_dir (the
default, one process); a postgresql:// URL, PostgreSQL (any number of replicas). Callers hold a
`Store` and never know which one it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from relayd.store.base import (
    EVERYTHING,
    REPLAYABLE,
    RESENDABLE,
    AttemptResult,
    Backlog,
    Delivery,
    Fence,
    Fenced,
    Filter,
    NewDelivery,
    OutboxError,
    OutboxFull,
    Reservation,
    Router,
    State,
    Store,
    StoreKind,
    Summary,
)
from relayd.store.sqlite import SqliteStore

OUTBOX_FILE = "outbox.sqlite3"  # the SQLite store's file in state_dir

__all__ = [
    "EVERYTHING",
    "OUTBOX_FILE",
    "REPLAYABLE",
    "RESENDABLE",
    "AttemptResult",
    "Backlog",
    "Delivery",
    "Fence",
    "Fenced",
    "Filter",
    "NewDelivery",
    "OutboxError",
    "OutboxFull",
    "Reservation",
    "Router",
    "SqliteStore",
    "State",
    "Store",
    "StoreKind",
    "Summary",
    "open_store",
]


def open_store(
    url: str | None,
    state_dir: Path,
    *,
    recover: bool,
    router: Router | None = None,
    replica: str | None = None,
    disk_reserve: int = 0,
    clock: Callable[[], float] = time.time,
) -> Store:
    """The store for `store.url` (None: SQLite at state_dir/outbox.sqlite3), not yet opened:
    `async with` it.

    `recover` puts rows left in flight by an earlier run of this process (SQLite: any; PostgreSQL:
    `replica`'s own) back in the queue: the daemon does, a CLI command opening it beside a
    running daemon never does. `disk_reserve` is SQLite's (see relayd.store.sqlite).
    """
    if url is None:
        return SqliteStore(
            state_dir / OUTBOX_FILE,
            recover=recover,
            router=router,
            clock=clock,
            disk_reserve=disk_reserve,
        )
    from relayd.store.postgres import PostgresStore  # asyncpg is loaded only when used

    return PostgresStore(url, recover=recover, router=router, replica=replica, clock=clock)
