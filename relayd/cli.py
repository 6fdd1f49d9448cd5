"""The `relayd` command: run, check-config, outbox, discover, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import yaml

from relayd import __version__, eventloop, logs
from relayd.auth import (
    AccountReport,
    AuthError,
    HttpClient,
    check_account,
    login,
    logout,
    sign_in_account,
)
from relayd.config import Config, ConfigError, WebhookConfig, load_config, parse_duration
from relayd.delivery import USER_AGENT
from relayd.network import Network
from relayd.store import OUTBOX_FILE, Filter, OutboxError, State, Store, open_store
from relayd.supervisor import (
    DAEMON_FILE,
    EXIT_LOST,
    StartupError,
    Supervisor,
    daemon_pid,
)

DEFAULT_CONFIG = "/etc/relayd/config.yaml"
# The admin server is local: asked directly, whatever HTTP_PROXY says (an opener with no
# proxies, where urlopen's default would read the proxy variables).
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CONFIG_HELP = f"config file (default: $RELAYD_CONFIG, else {DEFAULT_CONFIG})"


def config_path(given: str | None) -> Path:
    return Path(given or os.environ.get("RELAYD_CONFIG") or DEFAULT_CONFIG)


def _load(given: str | None, *, check_files: bool = False) -> Config:
    path = config_path(given)
    if not path.exists():
        raise ConfigFileMissing(f"{path}: no such config file (use --config or RELAYD_CONFIG)")
    return load_config(path, check_files=check_files)


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
    # uvloop when installed (relayd.eventloop): less CPU per idle socket and per notification.
    lost = eventloop.run(serve(config, config_path=config_path(args.config)))
    _exit_now(EXIT_LOST if lost else 0)


def _exit_now(code: int) -> NoReturn:
    """End the daemon without the interpreter's teardown.

    Everything that matters is done by now: the store is closed (what was accepted committed),
    the sockets and the event loop closed, and the logs are flushed here. What the interpreter
    would still do is collect every object of every drive, seconds at ten thousand drives, and a
    service manager's stop timeout counts them. Nothing in relayd relies on atexit.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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
    from relayd import status_view

    # A broken file on disk is when an operator most needs the answer: the daemon still runs its
    # last good config, and its state_dir says where it answers.
    config: Config | None = None
    refused: ConfigError | None = None
    try:
        config = _load(args.config)
    except ConfigError as exc:
        refused = exc
    state_dir = config.state_dir if config is not None else _state_dir_of(config_path(args.config))
    url = _admin_url(config, state_dir)
    if url is None:
        print("relayd: admin.listen is off, so the daemon cannot be asked", file=sys.stderr)
        return status_view.EXIT_NOT_RUNNING
    try:
        with _LOCAL.open(f"{url}/status", timeout=5) as response:
            report = json.load(response)
    except OSError as exc:
        if refused is not None:
            print(refused, file=sys.stderr)
        print(f"relayd: cannot reach the daemon at {url}: {exc}", file=sys.stderr)
        return status_view.EXIT_NOT_RUNNING
    if refused is not None:
        report["config_on_disk"] = [str(issue) for issue in refused.issues]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if refused is not None:
            print("the config file on disk does not load; the daemon runs its last good one:")
            print("".join(f"  {issue}\n" for issue in report["config_on_disk"]))
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print(status_view.render(report, now=time.time(), color=color), end="")
    return status_view.exit_code(report)


def _state_dir_of(path: Path) -> Path:
    """state_dir as a config file that does not validate names it, if it names one; else the
    default (systemd's $STATE_DIRECTORY, or ./state)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        # Not YAML any more: its top-level `state_dir:` line, if that one is still readable.
        line = re.search(r"^state_dir:[ \t]*['\"]?([^'\"#\n]+?)['\"]?[ \t]*(#.*)?$", text, re.M)
        document = {"state_dir": line.group(1)} if line else None
    named = document.get("state_dir") if isinstance(document, dict) else None
    if isinstance(named, str) and named.strip() and "${" not in named:
        return (path.absolute().parent / named).absolute()
    systemd = os.environ.get("STATE_DIRECTORY")
    return Path(systemd.split(":")[0]) if systemd else Path("state").absolute()


def _admin_url(config: Config | None, state_dir: Path) -> str | None:
    """Where the daemon on `state_dir` answers: what it wrote there at its start (right even
    when the file on disk changed since), else the config's admin.listen."""
    try:
        written = json.loads((state_dir / DAEMON_FILE).read_text())
    except (OSError, ValueError):
        written = None
    if (
        isinstance(written, dict)
        and written.get("admin")
        and daemon_pid(state_dir) == written.get("pid")
    ):
        return str(written["admin"])
    if config is None or not config.admin.enabled:
        return None
    return config.admin.local_url()


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config, check_files=True)
    print(
        f"{config_path(args.config)}: ok ({len(config.drives)} drives, "
        f"{len(config.webhooks)} webhooks, {len(config.accounts)} accounts)"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from relayd.doctor import Check, format_check, run_checks

    path = config_path(args.config)
    config = _load(args.config, check_files=True)  # an invalid file stops here, as check-config
    counts = (
        f"{len(config.drives)} drives, {len(config.webhooks)} webhooks,"
        f" {len(config.accounts)} accounts"
    )
    checks = [
        Check("config", True, f"{path} is valid ({counts})"),
        *asyncio.run(run_checks(config)),
    ]
    width = max(len(check.subject) for check in checks)
    for check in checks:
        print(format_check(check, width))
    return 0 if all(check.ok for check in checks) else 1


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
        ids=tuple(args.ids) if args.action != "show" else (),
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _outbox_command(args: argparse.Namespace, config: Config) -> int:
    path = config.state_dir / OUTBOX_FILE
    if config.store.url is None and not path.exists():
        raise OutboxError(f"{path}: no outbox yet (has relayd run with this state_dir?)")
    selection = _selection(args)
    async with open_store(config.store.url, config.state_dir, recover=False) as outbox:
        problem = await _unknown_names(outbox, config, selection)
        if problem is not None:
            print(f"relayd: outbox {args.action}: {problem}", file=sys.stderr)
            return 1
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
            _print_rows(await outbox.rows(selection, limit=args.limit + 1), args)
        elif args.action == "show":
            return await _show(outbox, config, args)
        else:
            return await _repair(outbox, args, selection)
    return 0


async def _unknown_names(outbox: Store, config: Config, selection: Filter) -> str | None:
    """A --webhook or --drive that names nothing, neither in the config nor in the outbox:
    a typo, which would otherwise look like an empty outbox."""
    asked = [
        (kind, name, set(known))
        for kind, name, known in (
            ("webhook", selection.webhook, config.webhooks),
            ("drive", selection.drive, (drive.name for drive in config.drives)),
        )
        if name is not None
    ]
    if all(name in known for _, name, known in asked):
        return None
    webhooks, drives = await outbox.names()
    for kind, name, known in asked:
        known |= webhooks if kind == "webhook" else drives
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            return f"no {kind} {name!r} in the config or the outbox (known: {listed})"
    return None


def _print_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    more = len(rows) > args.limit
    rows = rows[: args.limit]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(
            f"{'id':>7} {'message_id':<36} {'webhook':<14} {'drive':<14} {'state':<9}"
            f" {'tries':>5} {'status':>6} {'ms':>7}  {'created':<20} {'next attempt':<20}"
            " last error"
        )
        for row in rows:
            latency = "-" if row["last_latency"] is None else f"{row['last_latency'] * 1000:.0f}"
            due = _when(row["next_attempt"]) if row["state"] == State.PENDING.value else "-"
            print(
                f"{row['id']:>7} {row['message_id']:<36}"
                f" {row['webhook']:<14} {row['drive']:<14}"
                f" {row['state']:<9} {row['attempts']:>5} {row['last_status'] or '-':>6}"
                f" {latency:>7}  {_when(row['created']):<20} {due:<20} {row['last_error'] or ''}"
            )
    if more:
        # On stderr: a script reading the rows (--json) gets rows only.
        print(
            f"(stopped at --limit {args.limit}; more rows match: raise --limit or narrow the"
            " selection)",
            file=sys.stderr,
        )


async def _show(outbox: Store, config: Config, args: argparse.Namespace) -> int:
    if len(args.ids) != 1:
        print("relayd: outbox show takes one row id (see `relayd outbox list`)", file=sys.stderr)
        return 1
    row = await outbox.row(args.ids[0])
    if row is None:
        print(f"relayd: outbox show: no row {args.ids[0]}", file=sys.stderr)
        return 1
    webhook = config.webhooks.get(row["webhook"])
    headers = sent_headers(row, webhook)
    body = bytes(row["body"]).decode("utf-8", "replace")
    if args.json:
        shown = {key: value for key, value in row.items() if key not in ("body", "attempt_log")}
        print(
            json.dumps({**shown, "headers": headers, "body": body, "attempts": row["attempt_log"]})
        )
        return 0
    print(f"row {row['id']}  {row['message_id']}  {row['state']}")
    print(f"  webhook  {row['webhook']}" + ("" if webhook else " (not in the config any more)"))
    print(f"  drive    {row['drive']}")
    print(f"  created  {_when(row['created'])}")
    if row["state"] == State.PENDING.value:
        print(f"  next attempt due {_when(row['next_attempt'])}")
    if webhook is not None:
        print(
            f"  POST {_origin_only(webhook.url)}/..."
            " (path and query not shown: they may hold a token)"
        )
    print("headers (of the last attempt; secrets hidden):")
    for name, value in headers.items():
        print(f"  {name}: {value}")
    print("body (the exact bytes of every attempt):")
    print(f"  {body}")
    print(f"attempts ({len(row['attempt_log'])}):")
    for number, attempt in enumerate(row["attempt_log"], 1):
        latency = "-" if attempt["latency"] is None else f"{attempt['latency'] * 1000:.0f} ms"
        outcome = attempt["error"] or "delivered"
        print(
            f"  {number:>3}  {_when(attempt['at'])}  {attempt['status'] or '-':>4}  {latency:>8}"
            f"  {outcome}"
        )
        if attempt["response"]:
            print(f"       answered: {_escape(attempt['response'][:200])}")
    return 0


def sent_headers(row: dict[str, Any], webhook: WebhookConfig | None) -> dict[str, str]:
    """The headers of the row's last attempt as sent, with what may be secret hidden; pure."""
    headers = {"content-type": "application/json", "user-agent": USER_AGENT}
    if webhook is not None:
        headers |= {name: "<hidden>" for name in webhook.headers}
    headers["webhook-id"] = row["message_id"]
    if row["last_attempt"] is not None:
        headers["webhook-timestamp"] = str(int(row["last_attempt"]))
        if webhook is not None and webhook.secret:
            count = len(webhook.secret)
            headers["webhook-signature"] = f"<hidden: {count} v1 signature{'s' * (count > 1)}>"
    return headers


def _origin_only(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def _escape(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


async def _repair(outbox: Store, args: argparse.Namespace, selection: Filter) -> int:
    """`outbox replay` (dead rows, or waiting ones with --state pending), `outbox resend`
    (finished rows: delivered, dead or both) and `outbox purge` (finished rows, or waiting ones
    with --state pending). Without a filter each asks first (a terminal) or needs --yes."""
    action = args.action
    apply = {"replay": outbox.replay, "resend": outbox.resend, "purge": outbox.purge}[action]
    try:
        count = await apply(selection, dry_run=True)
        if args.dry_run:
            print(f"--dry-run, nothing changed: {_done(action, selection.state, count)}")
            return 0
        if not selection.narrows and not args.yes and count:
            if not sys.stdin.isatty():
                print(
                    f"relayd: outbox {action} without --webhook, --drive, --since, --until or ids"
                    f" reaches all {count} rows of every webhook: add --yes (or a filter)",
                    file=sys.stderr,
                )
                return 1
            question = f"{action} all {count} notifications of every webhook? [y/N] "
            answer = await asyncio.to_thread(input, question)
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing changed")
                return 1
        count = await apply(selection)
    except ValueError as exc:  # a state the action never reaches, inflight above all
        print(f"relayd: outbox {action}: {exc}", file=sys.stderr)
        return 1
    print(_done(action, selection.state, count))
    return 0


def _done(action: str, state: State | None, count: int) -> str:
    """What a repair did, in words; pure."""
    waiting = state is State.PENDING
    if action == "replay":
        if waiting:
            return f"{count} waiting notifications due now, with a fresh backoff and max_age"
        return f"{count} dead notifications back in the queue"
    if action == "resend":
        kind = state.value if state is not None else "finished"
        return f"{count} {kind} notifications due now to be sent again, with the same webhook-id"
    return f"{count} {'waiting' if waiting else 'finished'} notifications deleted"


def cmd_outbox(args: argparse.Namespace) -> int:
    config = _load(args.config)
    return asyncio.run(_outbox_command(args, config))


# -- sign-in ----------------------------------------------------------------------------------


def _sign_in_client(config: Config) -> HttpClient:
    """MSAL's HTTP client for the CLI: the daemon's trust (tls.ca_file) and proxy (graph.proxy)."""
    try:
        network = Network.from_environment(config.tls.ca_file)
    except (OSError, ValueError) as exc:  # SSL_CERT_FILE (tls.ca_file was checked at load)
        print(f"relayd: cannot load the CA bundle of SSL_CERT_FILE: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    return network.sign_in_session(config.graph.proxy)


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
            http_client=_sign_in_client(config),
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

    from relayd.doctor import graph_accepts_tokens

    async def check_all() -> tuple[list[AccountReport], dict[str, Any]]:
        client = _sign_in_client(config)
        checks = [
            check_account(name, account, config.state_dir, http_client=client)
            for name, account in config.accounts.items()
        ]
        # A token the source gives is not yet one Graph takes (revoked, wrong tenant or
        # audience): one cheap GET each says which.
        return list(await asyncio.gather(*checks)), await graph_accepts_tokens(config)

    reports, accepted = asyncio.run(check_all())
    print(f"{'account':<16} {'kind':<8} {'user':<30} {'scopes':<20} status")
    ok = True
    for report in reports:
        verdict = accepted[report.name]
        until = _when(report.expires_at)
        if report.problem is not None:
            status, ok = report.problem, False
        elif not verdict.ok:
            status, ok = verdict.detail, False
        elif report.kind == "msal":
            status = f"ok: silent refresh works, Graph accepts the token (until {until})"
        else:
            status = f"ok: Graph accepts the token (until {until})"
        scopes = " ".join(report.scopes) or "-"
        print(f"{report.name:<16} {report.kind:<8} {report.user or '-':<30} {scopes:<20} {status}")
    return 0 if ok else 1


def cmd_discover(args: argparse.Namespace) -> int:
    from relayd import discover  # only this command needs it

    config = _load(args.config)
    try:
        listing = asyncio.run(discover.discover(config, args.account, search=args.search))
    except discover.DiscoverError as exc:
        print(f"relayd: discover: {exc}", file=sys.stderr)
        return 1
    # Notes (what was skipped) to stderr, so stdout is YAML to paste as it is.
    sys.stderr.write(discover.notes_text(listing.notes))
    sys.stdout.write(discover.render(listing, config, args.account))
    return 0


# -- demo ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from relayd.demo import run_demo  # the emulator is only imported when asked for

    logs.configure("info", "console")
    return asyncio.run(run_demo(count=args.count, interval=args.interval))


def cmd_emulator(options: Sequence[str]) -> int:
    from relayd.emulator.graph import main as emulator_main

    return emulator_main(options, prog="relayd emulator")


# -- entry point --------------------------------------------------------------------------------


CONFIG_ERROR = "1  the config file is missing or invalid (every problem is listed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Relay Microsoft Graph drive change notifications (socketIo) to webhooks.",
        epilog="`relayd COMMAND --help` describes a command, its options and its exit codes.",
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    # Also accepted before the command (`relayd -c FILE status`); the command's own wins.
    parser.add_argument("--config", "-c", dest="config_before", metavar="CONFIG", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, summary: str, exits: Sequence[str], *, config: bool = True, **options: Any
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog="exit codes:\n" + "\n".join(f"  {line}" for line in exits),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **options,
        )
        if config:
            sub.add_argument("--config", "-c", help=CONFIG_HELP)
        return sub

    command(
        "run",
        "run the relay until SIGTERM or SIGINT; SIGHUP re-reads the config",
        [
            "0  stopped cleanly: everything received is stored or delivered",
            CONFIG_ERROR + ", or it cannot start (state_dir locked, admin address in use)",
            "3  stopped while holding notifications it could not store (logged with counts)",
        ],
    ).set_defaults(handler=cmd_run)
    command(
        "check-config",
        "validate the config file and the files it names",
        ["0  the file is valid", CONFIG_ERROR],
    ).set_defaults(handler=cmd_check_config)
    command(
        "doctor",
        "check the config, then that each account gets a token Graph accepts, each webhook"
        " answers, state_dir is private and writable and the admin address is free",
        ["0  every check passed", "1  a check failed (each is one line), or " + CONFIG_ERROR[3:]],
    ).set_defaults(handler=cmd_doctor)
    command(
        "reload",
        "make the running daemon re-read its config (SIGHUP)",
        ["0  the daemon was asked", "1  no daemon runs on this state_dir, or " + CONFIG_ERROR[3:]],
    ).set_defaults(handler=cmd_reload)
    status = command(
        "status",
        "ask the running daemon how its drives, webhooks and accounts are doing",
        [
            "0  ready: every drive connected or settled, the outbox healthy",
            "1  the daemon cannot be asked (not running, admin.listen off), or " + CONFIG_ERROR[3:],
            "2  running but degraded: a drive not connected, a webhook failing, the outbox"
            " not taking notifications, a refused reload",
        ],
    )
    status.add_argument("--json", action="store_true", help="the daemon's whole report as JSON")
    status.set_defaults(handler=cmd_status)
    sign_in = command(
        "login",
        "sign a client_id account in with a device code",
        ["0  signed in", "1  the sign-in failed or the account is not a client_id one"],
    )
    sign_in.add_argument("account", help="a client_id account of the config")
    sign_in.set_defaults(handler=cmd_login)
    sign_out = command(
        "logout",
        "forget a client_id account's sign-in",
        ["0  signed out (or was not signed in)", "1  not a client_id account of the config"],
    )
    sign_out.add_argument("account", help="a client_id account of the config")
    sign_out.set_defaults(handler=cmd_logout)
    command(
        "accounts",
        "list the accounts and whether each gets a token that Graph accepts now",
        [
            "0  every account gets a token and Graph accepts it",
            "1  an account does not, or " + CONFIG_ERROR[3:],
        ],
    ).set_defaults(handler=cmd_accounts)

    find = command(
        "discover",
        "list the drives an account can watch, and print them as a drives: block to paste",
        [
            "0  listed (parts the account may not read are skipped with a note on stderr)",
            "1  the account gets no token, Graph refused or failed a request, or "
            + CONFIG_ERROR[3:],
        ],
    )
    find.add_argument("--account", required=True, help="an account of the config")
    find.add_argument("--search", help="also list the libraries of sites matching this text")
    find.set_defaults(handler=cmd_discover)

    outbox = command(
        "outbox",
        "inspect and repair the outbox (works while the daemon runs)",
        ["0  done", "1  no outbox yet, a filter the action cannot take, or " + CONFIG_ERROR[3:]],
    )
    outbox.add_argument(
        "action",
        choices=["status", "list", "show", "replay", "resend", "purge"],
        help="status: counts per webhook; list: rows, newest first; show ID: one row, its body"
        " and every attempt; replay: dead (or --state pending) rows due now; resend: finished"
        " rows sent again; purge: delete finished (or --state pending) rows",
    )
    outbox.add_argument(
        "ids", nargs="*", type=int, metavar="ID", help="row ids (show takes one; others filter)"
    )
    outbox.add_argument("--webhook", help="only this webhook")
    outbox.add_argument("--drive", help="only this drive")
    outbox.add_argument(
        "--state",
        choices=[s.value for s in State],
        help="only rows in this state; replay takes dead (default) or pending, resend"
        " delivered or dead (default: both), purge delivered, dead (default: both) or pending",
    )
    outbox.add_argument(
        "--since", type=_moment, help="created at or after: 2h, or 2026-11-26T10:00"
    )
    outbox.add_argument("--until", type=_moment, help="created before: 30m, or an ISO time")
    outbox.add_argument("--limit", type=int, default=100, help="rows to list (default 100)")
    outbox.add_argument("--json", action="store_true", help="list and show as JSON")
    outbox.add_argument(
        "--dry-run", action="store_true", help="replay, resend, purge: count, change nothing"
    )
    outbox.add_argument(
        "--yes",
        action="store_true",
        help="replay, resend, purge without a filter: do not ask (needed when not on a terminal)",
    )
    outbox.set_defaults(handler=cmd_outbox)

    demo = command(
        "demo",
        "run the relay against a local Graph emulator and webhook receiver",
        ["0  done (Ctrl-C, or --count reached)"],
        config=False,
    )
    demo.add_argument("--count", type=int, default=0, help="stop after this many (default: never)")
    demo.add_argument("--interval", type=float, default=1.0, help="seconds between notifications")
    demo.set_defaults(handler=cmd_demo)

    emulator = command(
        "emulator",
        "run the Graph socketIo emulator on its own, to build a config against it"
        " (`relayd emulator --help` lists its options; docs/emulator.md its control API)",
        ["0  stopped by SIGINT or SIGTERM", "2  an option is wrong"],
        config=False,
        add_help=False,
    )
    # Listed here for `relayd --help`; main() hands `relayd emulator ...` to the emulator's own
    # parser before this one sees it (argparse cannot pass on options such as --help).
    emulator.set_defaults(handler=lambda _: cmd_emulator([]))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["emulator"]:
        return cmd_emulator(given[1:])
    args = build_parser().parse_args(given)
    if getattr(args, "config", None) is None:
        args.config = args.config_before
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (ConfigFileMissing, StartupError, OutboxError, eventloop.EventLoopError) as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
