"""`store.url`: omitted, SQLite in state_dir; a postgresql:// URL, whose password is a secret."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from relayd.config import ConfigError, parse_config
from relayd.store import SqliteStore, open_store
from relayd.store.postgres import PostgresStore

PASSWORD = "pw-from-the-environment-93"


def parse(store: str, env: dict[str, str] | None = None) -> object:
    text = textwrap.dedent(
        """\
        accounts: {a: {token_file: /etc/relayd/token}}
        webhooks: {h: {url: "http://127.0.0.1:9/x"}}
        drives: [{name: d1, account: a, resource: me, webhook: h}]
        """
    )
    return parse_config(
        text + store, filename="config.yaml", env=env or {}, base_dir=Path("/etc/relayd")
    )


def test_without_store_url_the_store_is_sqlite_in_state_dir(tmp_path: Path) -> None:
    config = parse("")
    assert config.store.url is None  # type: ignore[attr-defined]
    store = open_store(None, tmp_path, recover=False)
    assert isinstance(store, SqliteStore)
    assert store.describe() == str(tmp_path / "outbox.sqlite3")


def test_a_postgresql_url_takes_its_password_from_the_environment_and_never_shows_it(
    tmp_path: Path,
) -> None:
    config = parse(
        "store: {url: 'postgresql://relayd:${PGPASSWORD}@db.internal:5432/relayd'}\n",
        env={"PGPASSWORD": PASSWORD},
    )
    url = config.store.url  # type: ignore[attr-defined]
    assert url == f"postgresql://relayd:{PASSWORD}@db.internal:5432/relayd"
    assert PASSWORD not in repr(config)
    store = open_store(url, tmp_path, recover=False, replica="r1")
    assert isinstance(store, PostgresStore)
    assert store.describe() == "postgresql://relayd@db.internal:5432/relayd"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://relayd:${PGPASSWORD}@db/relayd",
        "postgresql://relayd:${PGPASSWORD}@db:notaport/relayd",
        "postgresql://relayd:${PGPASSWORD}@db",  # no database
        "postgresql://relayd:${PGPASSWORD}@/relayd",  # no host
    ],
)
def test_a_url_that_is_not_postgresql_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"store: {{url: '{url}'}}\n", env={"PGPASSWORD": PASSWORD})
    message = str(caught.value)
    assert "store.url: expected postgresql://" in message
    assert PASSWORD not in message
