"""`relayd status` with a cluster (pure): the replicas, who holds each drive, and the verdict
turning degraded when a drive has no holder or this replica cannot renew its leases."""

from __future__ import annotations

from typing import Any

from relayd.status_view import EXIT_DEGRADED, EXIT_OK, exit_code, problems, render

NOW = 1_800_000_000.0


def report(**changes: Any) -> dict[str, Any]:
    """A healthy replica's /status with one connected drive."""
    base: dict[str, Any] = {
        "ready": True,
        "daemon": {"version": "1.2.3", "pid": 42, "started": NOW - 3700},
        "drives": {
            "alice": {
                "state": "connected",
                "since": NOW - 60,
                "last_notification": NOW - 5,
                "reconnects": 0,
                "backlog": 0,
                "last_error": None,
            },
        },
        "webhooks": {},
        "accounts": {},
        "outbox": {"ok": True},
        "lost": 0,
    }
    return {**base, **changes}


def cluster(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "replica": "relayd-a",
        "lease": 15.0,
        "healthy": True,
        "renew_failures": 0,
        "held": ["drive:alice"],
        "replicas": [
            {"name": "relayd-a", "alive": True, "started": NOW - 7200, "heartbeat": NOW - 2,
             "drives": 1, "admin": None, "version": "1.2.3"},
            {"name": "relayd-b", "alive": True, "started": NOW - 60, "heartbeat": NOW - 4,
             "drives": 1, "admin": None, "version": "1.2.3"},
            {"name": "relayd-old", "alive": False, "started": NOW - 9000, "heartbeat": NOW - 600,
             "drives": 0, "admin": None, "version": "1.2.2"},
        ],
        "drives": {"alice": "relayd-a", "bob": "relayd-b"},
        "error": None,
    }  # fmt: skip
    return {**base, **changes}


def test_the_replicas_and_the_holder_of_each_drive_are_shown() -> None:
    text = render(report(cluster=cluster()), now=NOW, color=False)
    assert "cluster: this is replica relayd-a, lease 15s" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("REPLICA"))
    assert lines[header].split() == ["REPLICA", "STATE", "UP", "LAST", "HEARTBEAT", "DRIVES"]
    assert lines[header + 1].split() == [
        "relayd-a",
        "(this",
        "one)",
        "alive",
        "2h0m",
        "2s",
        "ago",
        "1",
    ]
    assert lines[header + 2].split() == ["relayd-b", "alive", "1m00s", "4s", "ago", "1"]
    assert lines[header + 3].split() == ["relayd-old", "gone", "-", "10m00s", "ago", "0"]
    held = next(
        i for i, line in enumerate(lines) if line.startswith("DRIVE ") and "HELD BY" in line
    )
    assert lines[held + 1].split() == ["alice", "relayd-a"]
    assert lines[held + 2].split() == ["bob", "relayd-b"]
    assert exit_code(report(cluster=cluster())) == EXIT_OK


def test_a_drive_nobody_holds_or_leases_not_renewed_make_it_degraded() -> None:
    orphaned = report(cluster=cluster(drives={"alice": "relayd-a", "bob": None}))
    assert problems(orphaned) == ["1 drive held by no replica"]
    assert exit_code(orphaned) == EXIT_DEGRADED
    assert "bob    none" in render(orphaned, now=NOW, color=False)
    cut_off = report(cluster=cluster(healthy=False, error="PostgreSQL: no answer in time"))
    assert problems(cut_off) == ["cluster leases not renewed", "cluster view unreadable"]
    assert "cannot read the cluster view: PostgreSQL: no answer in time" in render(
        cut_off, now=NOW, color=False
    )


def test_without_a_cluster_nothing_changes() -> None:
    assert "cluster" not in render(report(), now=NOW, color=False)
