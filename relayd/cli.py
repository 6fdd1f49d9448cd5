"""The `relayd` command: run, check-config, outbox, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from relayd import __version__, logs
from relayd.auth import (
    AccountReport,
    AuthError,
    check_account,
    login,
    logout,
    sign_in_account,
)
from relayd.config import Config, ConfigError, load_config, parse_duration
from relayd.outbox import Filter, Outbox, OutboxError, State
from relayd.supervisor import EXIT_LOST, OUTBOX_FILE, StartupError, Supervisor, daemon_pid

DEFAULT_CONFIG = "/etc/relayd/config.yaml"


def config_path(given: str | None) -> Path:
    return Path(given or os.environ.get("RELAYD_CONFIG") or DEFAULT_CONFIG)


def _load(given: str | None) -> Config:
    path = config_path(given)
    if not path.exists():
        raise ConfigFileMissing(f"{path}: no such config file (use --config or RELAYD_CONFIG)")
    return load_config(path)


class ConfigFileMissing(Exception):
    pass


# -- run ----------------------------------------------------------------------------------------


async def serve(
    config: Config, shutdown: asyncio.Event | None = None, *, config_path: Path | None = None
) -> int:
    """Run the relay until SIGTERM or SIGINT (or until `shutdown` is set); SIGHUP reloads.

    Returns how many notifications received from Graph were lost (never stored) at the stop."""
    stop = shutdown or asyncio.Event()
    supervisor = Supervisor(config, config_path=config_path)
    loop = asyncio.get_running_loop()
    # The handlers only set events: the supervisor's own loop does the stopping and reloading.
    handlers = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
        signal.SIGHUP: supervisor.request_reload,
    }
    for signum, handler in handlers.items():
        loop.add_signal_handler(signum, handler)
    try:
        await supervisor.run(stop)
    finally:
        for signum in handlers:
            loop.remove_signal_handler(signum)
    return supervisor.lost


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    logs.configure(config.log.level, config.log.format)
    # The outbox's thread waits for the GIL after each SQLite call; with the default 5 ms switch
    # interval a busy event loop keeps it waiting, and deliveries wait on its commits.
    sys.setswitchinterval(0.0005)
    # Whatever the service manager's umask: state files hold tenant ids, notification bodies and
    # receivers' answers, and are for relayd's user alone.
    os.umask(os.umask(0o077) | 0o077)
    lost = asyncio.run(serve(config, config_path=config_path(args.config)))
    return EXIT_LOST if lost else 0


def cmd_reload(args: argparse.Namespace) -> int:
    config = _load(args.config)  # a file that does not load would be refused anyway: say so now
    pid = daemon_pid(config.state_dir)
    if pid is None:
        print(f"relayd: no relayd is running with state_dir {config.state_dir}", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"asked relayd (pid {pid}) to reload {config_path(args.config)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if not config.admin.enabled:
        print("relayd: admin.listen is off, so the daemon cannot be asked", file=sys.stderr)
        return 1
    host = config.admin.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{config.admin.port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            report = json.load(response)
    except OSError as exc:
        print(f"relayd: cannot reach the daemon at {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'drive':<20} {'state':<14} {'since':<21} {'last notification':<21} backlog")
    for name, drive in report["drives"].items():
        backlog = sum(report["backlog"].get(webhook, 0) for webhook in drive["webhooks"])
        print(
            f"{name:<20} {drive['state']:<14} {_when(drive['since']):<21}"
            f" {_when(drive['last_notification']):<21} {backlog}"
        )
    _print_tenants(report.get("tenants", {}))
    if not report["reload"]["ok"]:
        print(f"\nlast reload refused:\n{report['reload']['error']}")
    return 0 if report["ready"] else 2


def _print_tenants(tenants: dict[str, dict[str, object]]) -> None:
    """Each tenant's Graph budget (used in the last minute / per minute) and throttling."""
    if not tenants:
        return
    print(f"\n{'tenant':<36} {'last minute':>15} {'waiting':>8} {'throttled':>10}  paused until")
    for name, tenant in tenants.items():
        used = f"{tenant['used_last_minute']}/{tenant['budget_per_minute']}"
        throttled = f"{float(str(tenant['throttled_seconds'])):.0f}s"
        until = tenant["throttled_until"]
        paused = _when(float(str(until))) if until is not None else "-"
        print(f"{name:<36} {used:>15} {tenant['waiting']!s:>8} {throttled:>10}  {paused}")


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(
        f"{config_path(args.config)}: ok ({len(config.drives)} drives, "
        f"{len(config.webhooks)} webhooks, {len(config.accounts)} accounts)"
    )
    return 0


# -- outbox -------------------------------------------------------------------------------------


def _moment(text: str) -> float:
    """`2h` (that long ago) or an ISO 8601 time."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration like 2h nor a time like 2026-11-26T10:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()


def _selection(args: argparse.Namespace) -> Filter:
    return Filter(
        webhook=args.webhook,
        drive=args.drive,
        state=State(args.state) if args.state else None,
        since=args.since,
        until=args.until,
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _outbox_command(args: argparse.Namespace, config: Config) -> int:
    path = config.state_dir / OUTBOX_FILE
    if not path.exists():
        raise OutboxError(f"{path}: no outbox yet (has relayd run with this state_dir?)")
    selection = _selection(args)
    async with Outbox(path, recover=False) as outbox:
        if args.action == "status":
            summary = await outbox.summary(selection)
            webhooks = sorted({webhook for webhook, _ in summary.counts})
            columns = ("pending", "inflight", "delivered", "dead")
            print(f"{'webhook':<20}" + "".join(f" {c:>9}" for c in columns) + "  oldest waiting")
            for webhook in webhooks:
                counts = [summary.counts.get((webhook, state), 0) for state in State]
                oldest = _when(summary.oldest_pending.get(webhook))
                print(f"{webhook:<20}" + "".join(f" {n:>9}" for n in counts) + f"  {oldest}")
        elif args.action == "list":
            rows = await outbox.rows(selection, limit=args.limit)
            if args.json:
                for row in rows:
                    print(json.dumps(row))
            else:
                print(
                    f"{'id':>7} {'message_id':<36} {'webhook':<14} {'drive':<14} {'state':<9}"
                    f" {'tries':>5} {'status':>6} {'ms':>7}  created / last error"
                )
                for row in rows:
                    latency = (
                        "-" if row["last_latency"] is None else f"{row['last_latency'] * 1000:.0f}"
                    )
                    print(
                        f"{row['id']:>7} {row['message_id']:<36}"
                        f" {row['webhook']:<14} {row['drive']:<14}"
                        f" {row['state']:<9} {row['attempts']:>5} {row['last_status'] or '-':>6}"
                        f" {latency:>7}  {_when(row['created'])} {row['last_error'] or ''}"
                    )
        elif args.action in ("replay", "purge"):
            return await _repair(outbox, args.action, selection)
    return 0


async def _repair(outbox: Outbox, action: str, selection: Filter) -> int:
    """`outbox replay` (dead rows, or waiting ones with --state pending) and `outbox purge`
    (finished rows, or waiting ones with --state pending)."""
    try:
        if action == "replay":
            count = await outbox.replay(selection)
        else:
            count = await outbox.purge(selection)
    except ValueError as exc:  # a state the action never reaches, inflight above all
        print(f"relayd: outbox {action}: {exc}", file=sys.stderr)
        return 1
    waiting = selection.state is State.PENDING
    if action == "replay":
        if waiting:
            print(f"{count} waiting notifications due now, with a fresh backoff and max_age")
        else:
            print(f"{count} dead notifications back in the queue")
    else:
        print(f"{count} {'waiting' if waiting else 'finished'} notifications deleted")
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    config = _load(args.config)
    return asyncio.run(_outbox_command(args, config))


# -- sign-in ----------------------------------------------------------------------------------


def cmd_login(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        account = sign_in_account(config.accounts, args.account)
        # The code and URL are for the person at the terminal; flush before the wait begins.
        user = login(
            args.account,
            account,
            config.state_dir,
            show=lambda message: print(message, flush=True),
        )
    except AuthError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    print(f"account {args.account!r} is signed in as {user}; a running relayd uses it from now on")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        account = sign_in_account(config.accounts, args.account)
        removed = logout(args.account, account, config.state_dir)
    except AuthError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    if removed:
        print(f"account {args.account!r} is signed out; its drives wait for `relayd login`")
    else:
        print(f"account {args.account!r} was not signed in")
    return 0


def cmd_accounts(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if not config.accounts:
        print(f"{config_path(args.config)}: no accounts")
        return 0

    async def check_all() -> list[AccountReport]:
        checks = [
            check_account(name, account, config.state_dir)
            for name, account in config.accounts.items()
        ]
        return list(await asyncio.gather(*checks))

    reports = asyncio.run(check_all())
    print(f"{'account':<16} {'kind':<8} {'user':<30} {'scopes':<20} status")
    for report in reports:
        if report.problem is not None:
            status = report.problem
        elif report.kind == "msal":
            status = f"ok: silent refresh works (token until {_when(report.expires_at)})"
        else:
            status = f"ok: token obtained (until {_when(report.expires_at)})"
        scopes = " ".join(report.scopes) or "-"
        print(f"{report.name:<16} {report.kind:<8} {report.user or '-':<30} {scopes:<20} {status}")
    return 0 if all(report.ok for report in reports) else 1


# -- demo ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from relayd.demo import run_demo  # the emulator is only imported when asked for

    logs.configure("info", "console")
    return asyncio.run(run_demo(count=args.count, interval=args.interval))


# -- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Relay Microsoft Graph drive change notifications (socketIo) to webhooks.",
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            "-c",
            help=f"config file (default: $RELAYD_CONFIG, else {DEFAULT_CONFIG})",
        )
        return sub

    with_config(commands.add_parser("run", help="run the relay")).set_defaults(handler=cmd_run)
    with_config(
        commands.add_parser("check-config", help="validate the config file; exit 0 or 1")
    ).set_defaults(handler=cmd_check_config)
    with_config(
        commands.add_parser("reload", help="make the running daemon re-read its config (SIGHUP)")
    ).set_defaults(handler=cmd_reload)
    with_config(
        commands.add_parser("status", help="ask the running daemon how its drives are doing")
    ).set_defaults(handler=cmd_status)

    sign_in = with_config(
        commands.add_parser("login", help="sign an account in with a device code (client_id)")
    )
    sign_in.add_argument("account", help="a client_id account of the config")
    sign_in.set_defaults(handler=cmd_login)
    sign_out = with_config(commands.add_parser("logout", help="forget an account's sign-in"))
    sign_out.add_argument("account", help="a client_id account of the config")
    sign_out.set_defaults(handler=cmd_logout)
    with_config(
        commands.add_parser(
            "accounts", help="list accounts and whether each gets a token now; exit 0 or 1"
        )
    ).set_defaults(handler=cmd_accounts)

    outbox = with_config(commands.add_parser("outbox", help="inspect and repair the outbox"))
    outbox.add_argument("action", choices=["status", "list", "replay", "purge"])
    outbox.add_argument("--webhook", help="only this webhook")
    outbox.add_argument("--drive", help="only this drive")
    outbox.add_argument(
        "--state",
        choices=[s.value for s in State],
        help="only rows in this state; replay takes dead (default) or pending, purge takes"
        " delivered, dead (default: both) or pending",
    )
    outbox.add_argument(
        "--since", type=_moment, help="created at or after: 2h, or 2026-11-26T10:00"
    )
    outbox.add_argument("--until", type=_moment, help="created before: 30m, or an ISO time")
    outbox.add_argument("--limit", type=int, default=100, help="rows to list (default 100)")
    outbox.add_argument("--json", action="store_true", help="list as JSON lines")
    outbox.set_defaults(handler=cmd_outbox)

    demo = commands.add_parser(
        "demo", help="run the relay against a local Graph emulator and webhook receiver"
    )
    demo.add_argument("--count", type=int, default=0, help="stop after this many (default: never)")
    demo.add_argument("--interval", type=float, default=1.0, help="seconds between notifications")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (ConfigFileMissing, StartupError, OutboxError) as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
