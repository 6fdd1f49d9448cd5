"""The `cluster:` section as a user writes it: its defaults, durations, ${HOSTNAME}, and the
refusal of a cluster without the PostgreSQL store (each replica would run every drive alone)."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest

from relayd.config import ConfigError, parse_config

URL = "postgresql://relayd:${PGPASSWORD}@db.internal:5432/relayd"


def parse(text: str, env: dict[str, str]) -> object:
    return parse_config(
        textwrap.dedent(text), filename="config.yaml", env=env, base_dir=Path("/etc/relayd")
    )


def test_defaults_are_hostname_pid_and_fifteen_seconds() -> None:
    config = parse(f"store:\n  url: {URL}\ncluster: {{}}\n", {"PGPASSWORD": "pw"})
    cluster = config.cluster  # type: ignore[attr-defined]
    assert cluster.replica == f"{socket.gethostname()[:50]}-{os.getpid()}"
    assert cluster.lease == 15.0


def test_the_replica_name_comes_from_the_environment_and_the_lease_is_a_duration() -> None:
    text = f"""
    store:
      url: {URL}
    cluster:
      replica: ${{HOSTNAME}}
      lease: 4s
    """
    config = parse(text, {"PGPASSWORD": "pw", "HOSTNAME": "relayd-7d9f-abcde"})
    cluster = config.cluster  # type: ignore[attr-defined]
    assert (cluster.replica, cluster.lease) == ("relayd-7d9f-abcde", 4.0)


def test_a_cluster_on_sqlite_is_refused_at_check_time() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("cluster:\n  lease: 5s\n", {})
    assert [str(issue) for issue in caught.value.issues] == [
        "config.yaml:1: cluster: a cluster needs the PostgreSQL store: set store.url"
        " (postgresql://...), or remove the cluster section to run one relayd on SQLite"
    ]


@pytest.mark.parametrize("lease", ["0s", "500ms", "2h"])
def test_a_lease_outside_one_second_to_an_hour_is_refused(lease: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"store:\n  url: {URL}\ncluster:\n  lease: {lease}\n", {"PGPASSWORD": "pw"})
    assert "cluster.lease" in str(caught.value)
