"""`relayd status`'s screen from a /status report: the verdict, aligned tables, colour (pure)."""

from __future__ import annotations

from typing import Any

from relayd.status_view import EXIT_DEGRADED, EXIT_OK, exit_code, problems, render

NOW = 1_800_000_000.0


def report(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ready": True,
        "daemon": {"version": "1.2.3", "pid": 42, "started": NOW - 3700, "config": "/etc/r.yaml"},
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
        "webhooks": {
            "downstream": {
                "healthy": True,
                "failing_since": None,
                "last_error": None,
                "last_status": None,
                "backlog": 0,
                "oldest_waiting": None,
                "dead_letters": 0,
                "next_retry_due": None,
            }
        },
        "accounts": {
            "work": {"token": "accepted", "drives": 1, "connected": 1, "last_error": None}
        },
        "outbox": {"ok": True, "disk_full": False},
        "lost": 0,
        "reload": {"ok": True, "error": None},
    }
    base.update(changes)
    return base


def test_all_fine_says_ok_and_exits_0() -> None:
    text = render(report(), now=NOW, color=False)
    assert text.splitlines()[0] == "relayd 1.2.3, pid 42, up 1h1m: ok"
    assert exit_code(report()) == EXIT_OK


def test_a_failing_webhook_and_a_refused_reload_are_named_with_their_reasons() -> None:
    failing = report(
        webhooks={
            "downstream": {
                "healthy": False,
                "failing_since": NOW - 252,
                "last_error": "timeout after 15s",
                "last_status": None,
                "backlog": 312,
                "oldest_waiting": NOW - 250,
                "dead_letters": 2,
                "next_retry_due": NOW + 12,
            }
        },
        reload={"ok": False, "error": "c.yaml:3: drives[0].resourse: unknown key"},
    )
    assert problems(failing) == ["webhook downstream failing", "last reload refused"]
    assert exit_code(failing) == EXIT_DEGRADED
    lines = render(failing, now=NOW, color=False).splitlines()
    assert lines[0].endswith(": degraded: webhook downstream failing, last reload refused")
    assert "  c.yaml:3: drives[0].resourse: unknown key" in lines
    header = next(line for line in lines if line.startswith("WEBHOOK"))
    row = next(line for line in lines if line.startswith("downstream"))
    assert row.split("  ")[0] == "downstream"
    # Columns line up under their headings.
    assert row.index("failing for 4m12s") == header.index("HEALTH")
    assert row.index("312") == header.index("BACKLOG")
    assert "in 12s" in row and "timeout after 15s" in row


def test_colour_on_a_terminal_keeps_the_columns_aligned() -> None:
    down = report(
        drives={
            "alice": {
                "state": "reconnecting",
                "since": NOW - 30,
                "last_notification": None,
                "reconnects": 3,
                "backlog": 1,
                "last_error": "GraphError: 503 serviceNotAvailable",
            }
        }
    )
    coloured = render(down, now=NOW, color=True)
    assert "\033[33mreconnecting\033[0m" in coloured
    plain = render(down, now=NOW, color=False)
    stripped = coloured.replace("\033[33m", "").replace("\033[0m", "").replace("\033[31m", "")
    stripped = stripped.replace("\033[32m", "")
    assert stripped == plain


def test_a_paused_tenant_is_named_with_its_budget_and_the_end_of_its_pause() -> None:
    tenants = {
        "contoso": {
            "budget_per_minute": 600,
            "used_last_minute": 412,
            "waiting": 37,
            "requests": 5000,
            "throttled": 2,
            "throttled_seconds": 75.0,
            "throttled_until": NOW + 42,
        },
        "account:ci": {
            "budget_per_minute": 600,
            "used_last_minute": 3,
            "waiting": 0,
            "requests": 9,
            "throttled": 0,
            "throttled_seconds": 0.0,
            "throttled_until": None,
        },
    }
    paused = report(tenants=tenants)
    assert problems(paused) == ["tenant contoso throttled by Graph"]
    assert exit_code(paused) == EXIT_DEGRADED
    lines = render(paused, now=NOW, color=False).splitlines()
    header = next(line for line in lines if line.startswith("TENANT"))
    assert header.split() == ["TENANT", "LAST", "MINUTE", "WAITING", "THROTTLED", "NOW"]
    assert next(line for line in lines if line.startswith("contoso")).split() == [
        "contoso",
        "412/600",
        "37",
        "1m15s",
        "paused,",
        "in",
        "42s",
    ]
    assert next(line for line in lines if line.startswith("account:ci")).split() == [
        "account:ci",
        "3/600",
        "0",
        "0s",
        "-",
    ]
    assert exit_code(report(tenants={"account:ci": tenants["account:ci"]})) == EXIT_OK
