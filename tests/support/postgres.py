"""A real PostgreSQL server for the tests: Debian's `postgresql` package, run unprivileged.

`scripts/test` installs the package; this module starts its own server in a temporary data
directory (initdb, then pg_ctl), as the unprivileged `postgres` user when the suite runs as root
(PostgreSQL refuses to run as root), listening on 127.0.0.1 at a free port. Nothing of the
machine's own clusters is touched. Every test gets a database of its own (`postgres_url`), so
tests never see each other's rows. The server can be stopped, started and restarted
(`immediate=True` is a crash: no shutdown checkpoint) by fault tests.

Durability settings are PostgreSQL's defaults (fsync and synchronous_commit on), the same as
production: a test that restarts the server mid-burst proves what a real server keeps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = [
    "PostgresServer",
    "own_postgres_server",
    "postgres_server",
    "postgres_url",
    "running_server",
]

SUPERUSER = "relayd"
# Enough for several replicas with their pools in one test; a leak of connections shows as a test
# failing here rather than as a slow machine.
MAX_CONNECTIONS = 200


def find_bindir() -> Path:
    """The newest Debian PostgreSQL server binaries (/usr/lib/postgresql/N/bin)."""
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise RuntimeError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: "
            "apt-get install postgresql (scripts/test does this)"
        )
    return versions[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL server in a temporary data directory, owned by this object."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.root = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
        self.data = self.root / "data"
        self.log_file = self.root / "server.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            # PostgreSQL will not run as root: run it as the package's own system user.
            self._user = "postgres"
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._databases = itertools.count(1)

    # -- life cycle ------------------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self._user,
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def init(self) -> None:
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-instructions",
        )

    def start(self) -> None:
        options = " ".join(
            [
                f"-c port={self.port}",
                f"-c listen_addresses={self.host}",
                f"-c unix_socket_directories={self.root}",
                f"-c max_connections={MAX_CONNECTIONS}",
                "-c log_min_messages=warning",
            ]
        )
        result = self._run(
            "pg_ctl",
            "start",
            "--wait",
            "--timeout",
            "30",
            "--pgdata",
            str(self.data),
            "--log",
            str(self.log_file),
            "-o",
            options,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{self.server_log()}")

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server: a clean shutdown, or `immediate` (a crash, recovered at start)."""
        self._run(
            "pg_ctl",
            "stop",
            "--wait",
            "--pgdata",
            str(self.data),
            "--mode",
            "immediate" if immediate else "fast",
        )

    def restart(self, *, immediate: bool = False) -> None:
        self.stop(immediate=immediate)
        self.start()

    def server_log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-4000:]
        return ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(immediate=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases -------------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        name = name or f"relayd_test_{next(self._databases)}"
        self._run("createdb", "--host", self.host, "--port", str(self.port), "-U", SUPERUSER, name)
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        """Run SQL through psql (for tests that look at or break the database directly)."""
        result = self._run(
            "psql",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "-U",
            SUPERUSER,
            "--no-psqlrc",
            "--tuples-only",
            "--no-align",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
            "-c",
            sql,
        )
        return result.stdout.strip()


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A new server, initialised and started; stopped and deleted at the end."""
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server per test process, shared by its tests (each in its own database)."""
    with running_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database of the shared server, for this test alone."""
    return postgres_server.create_database()


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A server for this test alone: for tests that stop, crash or restart it."""
    with running_server() as server:
        yield server
