"""The PostgreSQL test server itself: it starts unprivileged, keeps committed data over a crash."""

from __future__ import annotations

from support.postgres import PostgresServer


def test_each_test_gets_its_own_database(postgres_server: PostgresServer) -> None:
    first = postgres_server.create_database()
    second = postgres_server.create_database()
    assert first != second
    name = first.rsplit("/", 1)[1]
    postgres_server.psql(name, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    assert postgres_server.psql(name, "SELECT count(*) FROM t") == "1"
    assert postgres_server.psql(name, "SELECT current_setting('fsync')") == "on"


def test_a_crash_keeps_what_was_committed(own_postgres_server: PostgresServer) -> None:
    server = own_postgres_server
    name = server.create_database().rsplit("/", 1)[1]
    server.psql(name, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    server.restart(immediate=True)
    assert server.psql(name, "SELECT sum(x) FROM t") == "7"
    assert server.psql(name, "SELECT current_user") == "relayd"
