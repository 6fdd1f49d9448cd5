"""`relayd status` as a person reads it: the daemon's /status report as aligned tables, coloured on
a terminal; pure (the report and the clock come in, text goes out).

The verdict comes first ("ok", "degraded: 1 drive reconnecting, webhook hook failing"), then one
table per kind of thing, each row saying what it is doing and, when it is not fine, why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from relayd.outage import spell

EXIT_OK = 0
EXIT_NOT_RUNNING = 1
EXIT_DEGRADED = 2

_GREEN, _YELLOW, _RED, _RESET = "\033[32m", "\033[33m", "\033[31m", "\033[0m"
Cell = str | tuple[str, str]  # text, or (text, colour)
_FINE_STATES = {"connected"}
_WAITING_STATES = {"starting", "reconnecting"}


def problems(report: Mapping[str, Any]) -> list[str]:
    """What is not fine, in a few words each; empty when all is well."""
    found = []
    for name, drive in report.get("drives", {}).items():
        if drive["state"] not in _FINE_STATES:
            found.append(f"drive {name} {drive['state']}")
    for name, webhook in report.get("webhooks", {}).items():
        if not webhook["healthy"]:
            found.append(f"webhook {name} failing")
    outbox = report.get("outbox", {})
    if outbox and not outbox.get("ok", True):
        found.append("outbox full" if outbox.get("disk_full") else "outbox failing")
    if report.get("lost"):
        found.append(f"{report['lost']} notifications lost")
    reload = report.get("reload", {})
    if reload and not reload.get("ok", True):
        found.append("last reload refused")
    for name, tenant in report.get("tenants", {}).items():
        if tenant.get("throttled_until") is not None:
            found.append(f"tenant {name} throttled by Graph")
    found += _cluster_problems(report.get("cluster"))
    return found


def _cluster_problems(cluster: Mapping[str, Any] | None) -> list[str]:
    if not cluster:
        return []
    found = []
    if not cluster.get("healthy", True):
        found.append("cluster leases not renewed")
    if cluster.get("error"):
        found.append("cluster view unreadable")
    else:
        unheld = sum(1 for holder in cluster.get("drives", {}).values() if holder is None)
        if unheld:
            found.append(f"{unheld} drive{'s' if unheld != 1 else ''} held by no replica")
    return found


def exit_code(report: Mapping[str, Any]) -> int:
    return EXIT_OK if report.get("ready") and not problems(report) else EXIT_DEGRADED


def render(report: Mapping[str, Any], *, now: float, color: bool) -> str:
    """The whole status screen."""
    paint = _painter(color)
    daemon = report.get("daemon", {})
    found = problems(report)
    verdict = paint("ok", _GREEN) if not found else paint("degraded: " + ", ".join(found), _RED)
    head = f"relayd {daemon.get('version', '?')}, pid {daemon.get('pid', '?')}"
    if daemon.get("started"):
        head += f", up {spell(now - daemon['started'])}"
    lines = [f"{head}: {verdict}"]
    if daemon.get("config"):
        lines.append(f"config {daemon['config']}")
    reload = report.get("reload", {})
    if reload and not reload.get("ok", True):
        lines.append(paint("last reload refused (the previous config still runs):", _RED))
        lines += [f"  {line}" for line in str(reload.get("error") or "").splitlines()]

    lines += _drive_lines(report.get("drives", {}), now, paint)
    lines += _webhook_lines(report.get("webhooks", {}), now, paint)
    lines += _account_lines(report.get("accounts", {}), now, paint)
    tenants = report.get("tenants", {})
    if tenants:
        lines += ["", *_tenant_table(tenants, now, paint)]
    cluster = report.get("cluster")
    if cluster:
        lines += ["", *_cluster_lines(cluster, now, paint)]
    return "\n".join(lines) + "\n"


def _cluster_lines(cluster: Mapping[str, Any], now: float, paint: Any) -> list[str]:
    """The replicas as the database has them, then which replica holds each drive."""
    me = cluster.get("replica", "?")
    lines = [f"cluster: this is replica {me}, lease {spell(cluster.get('lease', 0.0))}"]
    if cluster.get("error"):
        lines.append(paint(f"  cannot read the cluster view: {cluster['error']}", _RED))
        return lines
    rows: list[list[Cell]] = []
    for replica in cluster.get("replicas", []):
        name = replica["name"] + (" (this one)" if replica["name"] == me else "")
        alive = replica["alive"]
        rows.append(
            [
                name,
                ("alive", _GREEN) if alive else ("gone", _YELLOW),
                _age(replica["started"], now) if alive else "-",
                _ago(replica["heartbeat"], now),
                str(replica["drives"]),
            ]
        )
    lines += _table(["REPLICA", "STATE", "UP", "LAST HEARTBEAT", "DRIVES"], rows, paint)
    holders = [
        [drive, (holder, _GREEN) if holder else ("none", _RED)]
        for drive, holder in sorted(cluster.get("drives", {}).items())
    ]
    if holders:
        lines += ["", *_table(["DRIVE", "HELD BY"], holders, paint)]
    return lines


def _drive_lines(drives: Mapping[str, Any], now: float, paint: Any) -> list[str]:
    lines: list[str] = []
    if not drives:
        return lines
    rows: list[list[Cell]] = []
    for name, drive in drives.items():
        state = drive["state"]
        tone = _tone_of(state)
        rows.append(
            [
                name,
                (state, tone),
                _ago(drive.get("since"), now),
                _ago(drive.get("last_notification"), now),
                str(drive.get("reconnects", 0)),
                str(drive.get("backlog", 0)),
                (drive.get("last_error") or "-") if state not in _FINE_STATES else "-",
            ]
        )
    lines += [
        "",
        *_table(
            [
                "DRIVE",
                "STATE",
                "SINCE",
                "LAST NOTIFICATION",
                "RECONNECTS",
                "BACKLOG",
                "LAST ERROR",
            ],
            rows,
            paint,
        ),
    ]
    for name, drive in drives.items():
        running = (drive.get("delta") or {}).get("round")
        if running and running["seconds"] >= 1:
            lines.append(
                f"  {name}: delta round ({running['reason']}) running for"
                f" {spell(running['seconds'])}: {running['pages']} pages,"
                f" {running['items']} items ({running['items_per_second']:g}/s)"
            )

    return lines


def _webhook_lines(webhooks: Mapping[str, Any], now: float, paint: Any) -> list[str]:
    lines: list[str] = []
    if not webhooks:
        return lines
    rows: list[list[Cell]] = []
    for name, webhook in webhooks.items():
        if webhook["healthy"]:
            health: tuple[str, str] = ("healthy", _GREEN)
            error = "-"
        else:
            health = (f"failing for {spell(now - webhook['failing_since'])}", _RED)
            status = webhook.get("last_status")
            error = webhook.get("last_error") or "-"
            if status is not None and str(status) not in error:
                error = f"{status} {error}"
        rows.append(
            [
                name,
                health,
                str(webhook.get("backlog", 0)),
                _age(webhook.get("oldest_waiting"), now),
                str(webhook.get("dead_letters", 0)),
                _due(webhook.get("next_retry_due"), now),
                error,
            ]
        )
    lines += [
        "",
        *_table(
            ["WEBHOOK", "HEALTH", "BACKLOG", "OLDEST", "DEAD", "NEXT RETRY", "LAST ERROR"],
            rows,
            paint,
        ),
    ]

    return lines


def _account_lines(accounts: Mapping[str, Any], now: float, paint: Any) -> list[str]:
    lines: list[str] = []
    if not accounts:
        return lines
    rows: list[list[Cell]] = []
    for name, account in accounts.items():
        token = account["token"]
        tone = {"accepted": _GREEN, "needs_login": _RED}.get(token, _YELLOW)
        words = {
            "accepted": "accepted by Graph",
            "needs_login": "needs `relayd login`",
            "unknown": "not proven yet",
            "unused": "no drive uses it",
        }.get(token, token)
        rows.append(
            [
                name,
                (words, tone),
                f"{account.get('connected', 0)}/{account.get('drives', 0)}",
                account.get("last_error") or "-",
            ]
        )
    lines += ["", *_table(["ACCOUNT", "TOKEN", "CONNECTED", "LAST ERROR"], rows, paint)]
    return lines


def _tenant_table(tenants: Mapping[str, Any], now: float, paint: Any) -> list[str]:
    """Each tenant's Graph budget (docs/throttling.md): used in the last minute of the budget,
    requests waiting for their turn, time spent paused, and the pause under way."""
    rows: list[list[Cell]] = []
    for name, tenant in tenants.items():
        until = tenant.get("throttled_until")
        rows.append(
            [
                name,
                f"{tenant['used_last_minute']}/{tenant['budget_per_minute']}",
                str(tenant.get("waiting", 0)),
                spell(tenant.get("throttled_seconds", 0.0)),
                ("-", _GREEN) if until is None else (f"paused, {_due(until, now)}", _RED),
            ]
        )
    return _table(["TENANT", "LAST MINUTE", "WAITING", "THROTTLED", "NOW"], rows, paint)


def _table(header: Sequence[str], rows: Sequence[Sequence[Cell]], paint: Any) -> list[str]:
    """Columns aligned on the visible text; colour codes added after the padding."""
    plain = [[cell if isinstance(cell, str) else cell[0] for cell in row] for row in rows]
    widths = [max(len(text) for text in column) for column in zip(header, *plain, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        cells = []
        for cell, width in zip(row, widths, strict=True):
            if isinstance(cell, str):
                cells.append(cell.ljust(width))
            else:
                text, tone = cell
                cells.append(paint(text, tone) + " " * (width - len(text)))
        out.append("  ".join(cells).rstrip())
    return out


def _tone_of(state: str) -> str:
    if state in _FINE_STATES:
        return _GREEN
    return _YELLOW if state in _WAITING_STATES else _RED


def _painter(color: bool) -> Any:
    def paint(text: str, tone: str) -> str:
        return f"{tone}{text}{_RESET}" if color else text

    return paint


def _ago(moment: float | None, now: float) -> str:
    return "-" if moment is None else f"{spell(max(0.0, now - moment))} ago"


def _age(moment: float | None, now: float) -> str:
    return "-" if moment is None else spell(max(0.0, now - moment))


def _due(moment: float | None, now: float) -> str:
    if moment is None:
        return "-"
    return "now" if moment <= now else f"in {spell(moment - now)}"
