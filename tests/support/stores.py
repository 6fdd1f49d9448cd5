"""Both store backends for one suite: a test that asks for `store_backend` runs once on SQLite and
once on PostgreSQL (a fresh database of the shared server), unless marked `sqlite_only` (what is
SQLite's by nature: WAL, file modes, a full disk, another process's write lock).

`store_backend` also puts the backend in every config the test builds (support.configs), so the
delivery and delta tests run the whole relay on either store without a copy of themselves.
`Backend` opens stores on it and reads its tables directly, as another process would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relayd.store import OUTBOX_FILE, Router, Store, open_store
from support import configs

BACKENDS = ("sqlite", "postgresql")


class Backend:
    """One backend for one test: `open(...)` a store on it, `query(sql)` its tables."""

    def __init__(self, kind: str, state_dir: Path, url: str | None) -> None:
        self.kind = kind
        self.state_dir = state_dir
        self.url = url  # store.url: None for SQLite

    @property
    def path(self) -> Path:
        return self.state_dir / OUTBOX_FILE

    def open(
        self,
        *,
        recover: bool = True,
        router: Router | None = None,
        replica: str | None = "test-replica",
        clock: Callable[[], float] = time.time,
    ) -> Store:
        return open_store(
            self.url, self.state_dir, recover=recover, router=router, replica=replica, clock=clock
        )

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of a SELECT (or an UPDATE's effect), `?` placeholders, on a connection of the
        test's own."""
        if self.url is None:
            import sqlite3

            connection = sqlite3.connect(self.path)
            try:
                rows = connection.execute(sql, params).fetchall()
                connection.commit()  # an UPDATE a test makes
                return rows
            finally:
                connection.close()
        from relayd.store.postgres import numbered

        pg = await asyncpg.connect(self.url)
        try:
            return [tuple(row) for row in await pg.fetch(numbered(sql), *params)]
        finally:
            await pg.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: the test is about SQLite itself; run it on that backend alone"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" in metafunc.fixturenames:
        only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize(
            "store_backend", ["sqlite"] if only_sqlite else list(BACKENDS), indirect=True
        )


@pytest.fixture
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = getattr(request, "param", "sqlite")
    url = request.getfixturevalue("postgres_url") if kind == "postgresql" else None
    configs.STORE["url"] = url
    try:
        yield Backend(kind, tmp_path / "state", url)
    finally:
        configs.STORE["url"] = None
