"""asyncpg against psycopg 3 (async) on the operations the PostgreSQL store makes, in one run.

    python benchmarks/pg_drivers.py [--rows 1000] [--batch 50] [--round-trips 500] [--json]

Starts its own PostgreSQL server (tests/support/postgres.py: Debian's package, a temporary data
directory, fsync and synchronous_commit on as in production) and times, for each driver, on a
table shaped like the store's `deliveries`:

  insert     `--rows` rows in transactions of `--batch` rows (one multi-row statement each, as the
             store's group commit sends them), each committed durably before the next starts
  claim      `--round-trips` claim + record pairs: a transaction taking one due row
             (FOR UPDATE SKIP LOCKED) and marking it in flight, then one marking it delivered
  notify     `--round-trips` NOTIFY round trips seen by a second connection LISTENing

The figures decided the store's driver (docs/store.md); the ratio is what matters, not the times.
Needs psycopg, which relayd does not: `pip install 'psycopg[binary]'` first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import asyncpg
import psycopg
from support.postgres import running_server

TABLE = """
CREATE TABLE deliveries (
    id bigserial PRIMARY KEY, message_id text NOT NULL, webhook text NOT NULL,
    drive text NOT NULL, body bytea NOT NULL, created double precision NOT NULL,
    state text NOT NULL, next_attempt double precision NOT NULL, claimed_by text
);
CREATE INDEX deliveries_queue ON deliveries (webhook, state, next_attempt, id);
"""
BODY = b'{"value":[{"subscriptionId":"x","resource":"drives/abc/root","changeType":"updated"}]}' * 4


def _rows(n: int, start: int) -> list[tuple[Any, ...]]:
    return [(f"msg_{start + i}", "hook", "d1", BODY, time.time(), "pending", 0.0) for i in range(n)]


async def _timed(what: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await what()
    return time.perf_counter() - started


async def run_asyncpg(url: str, rows: int, batch: int, trips: int) -> dict[str, float]:
    connection = await asyncpg.connect(url)
    listener = await asyncpg.connect(url)
    await connection.execute("DROP TABLE IF EXISTS deliveries")
    await connection.execute(TABLE)

    async def insert() -> None:
        for start in range(0, rows, batch):
            values = _rows(batch, start)
            async with connection.transaction():
                # One statement for the batch: unnest over arrays, the usual asyncpg bulk insert.
                await connection.execute(
                    "INSERT INTO deliveries (message_id, webhook, drive, body, created, state,"
                    " next_attempt) SELECT * FROM unnest($1::text[], $2::text[], $3::text[],"
                    " $4::bytea[], $5::float8[], $6::text[], $7::float8[])",
                    *[list(column) for column in zip(*values, strict=True)],
                )

    async def claim() -> None:
        for _ in range(trips):
            async with connection.transaction():
                found = await connection.fetch(
                    "UPDATE deliveries SET state = 'inflight', claimed_by = 'r1' WHERE id IN"
                    " (SELECT id FROM deliveries WHERE webhook = $1 AND state = 'pending'"
                    " AND next_attempt <= $2 ORDER BY next_attempt, id LIMIT 1"
                    " FOR UPDATE SKIP LOCKED) RETURNING id, body",
                    "hook",
                    time.time(),
                )
            await connection.execute(
                "UPDATE deliveries SET state = 'delivered' WHERE id = $1", found[0]["id"]
            )

    async def notify() -> None:
        heard: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener("bench", lambda *args: heard.put_nowait(args[3]))
        for i in range(trips):
            await connection.execute(f"NOTIFY bench, '{i}'")
            await heard.get()

    figures = {
        "insert_s": await _timed(insert),
        "claim_s": await _timed(claim),
        "notify_s": await _timed(notify),
    }
    await connection.close()
    await listener.close()
    return figures


async def run_psycopg(url: str, rows: int, batch: int, trips: int) -> dict[str, float]:
    connection = await psycopg.AsyncConnection.connect(url, autocommit=True)
    listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await connection.execute("DROP TABLE IF EXISTS deliveries")
    await connection.execute(TABLE)

    async def insert() -> None:
        for start in range(0, rows, batch):
            values = _rows(batch, start)
            marks = ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(values))
            async with connection.transaction():
                await connection.execute(
                    "INSERT INTO deliveries (message_id, webhook, drive, body, created, state,"
                    f" next_attempt) VALUES {marks}",
                    [value for row in values for value in row],
                )

    async def claim() -> None:
        for _ in range(trips):
            async with connection.transaction():
                cursor = await connection.execute(
                    "UPDATE deliveries SET state = 'inflight', claimed_by = 'r1' WHERE id IN"
                    " (SELECT id FROM deliveries WHERE webhook = %s AND state = 'pending'"
                    " AND next_attempt <= %s ORDER BY next_attempt, id LIMIT 1"
                    " FOR UPDATE SKIP LOCKED) RETURNING id, body",
                    ("hook", time.time()),
                )
                found = await cursor.fetchall()
            await connection.execute(
                "UPDATE deliveries SET state = 'delivered' WHERE id = %s", (found[0][0],)
            )

    async def notify() -> None:
        await listener.execute("LISTEN bench")
        notifies = listener.notifies()
        for i in range(trips):
            await connection.execute(f"NOTIFY bench, '{i}'")
            await anext(notifies)

    figures = {
        "insert_s": await _timed(insert),
        "claim_s": await _timed(claim),
        "notify_s": await _timed(notify),
    }
    await connection.close()
    await listener.close()
    return figures


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with running_server() as server:
        url = server.create_database("bench")
        results: dict[str, dict[str, float]] = {}
        for name, run in (("asyncpg", run_asyncpg), ("psycopg", run_psycopg)) * 2:
            # Each twice, alternating: the second round is the one reported (caches warm).
            results[name] = await run(url, args.rows, args.batch, args.round_trips)
    a, p = results["asyncpg"], results["psycopg"]
    return {
        "settings": vars(args),
        "asyncpg": {k: round(v, 3) for k, v in a.items()},
        "psycopg": {k: round(v, 3) for k, v in p.items()},
        "psycopg_over_asyncpg": {k: round(p[k] / a[k], 2) for k in a},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    document = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(document))
        return 0
    print(f"{'':<10}{'asyncpg s':>12}{'psycopg s':>12}{'ratio':>8}")
    for key in document["asyncpg"]:
        print(
            f"{key[:-2]:<10}{document['asyncpg'][key]:>12}{document['psycopg'][key]:>12}"
            f"{document['psycopg_over_asyncpg'][key]:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
