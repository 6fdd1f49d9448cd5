"""`relayd doctor`: the checks an operator would make by hand before (or while) relayd runs.

check-config says whether the file is valid; doctor says whether it will work here and now:
every account gets a token *that Graph accepts* (one cheap GET per account), every webhook
answers a connect (TCP, and TLS with its certificate verified: a connect, never a delivery),
state_dir and the outbox are writable by this user and private, and the admin address is free
(or held by the relayd that runs on this state_dir). One line per check; any failure, exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from relayd.auth import AuthError, HttpClient
from relayd.config import AccountConfig, Config, WebhookConfig
from relayd.graph import GraphClient, GraphError, InvalidGraphResponse
from relayd.network import Network, Proxy, describe_connection_error
from relayd.store import OUTBOX_FILE, OutboxError
from relayd.supervisor import daemon_pid, token_provider

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    """One line of `relayd doctor`: what was checked, whether it passed, and what was seen."""

    subject: str  # "account work", "webhook downstream", "state_dir", ...
    ok: bool
    detail: str


def format_check(check: Check, width: int) -> str:
    """`ok    account work    token accepted by Graph ...`; pure."""
    return f"{'ok' if check.ok else 'FAIL':<5} {check.subject:<{width}}  {check.detail}"


async def run_checks(config: Config) -> list[Check]:
    """Every check, accounts and webhooks concurrently; in the config's order. Connections go
    the way the daemon's go: its TLS trust (tls.ca_file) and its proxies."""
    network = Network.from_environment(config.tls.ca_file)
    accounts, webhooks = await asyncio.gather(
        graph_accepts_tokens(config, network),
        asyncio.gather(
            *(check_webhook(name, webhook, network) for name, webhook in config.webhooks.items())
        ),
    )
    found = [*accounts.values(), *webhooks]
    state = check_state_dir(config.state_dir, sqlite=config.store.url is None)
    stores = [await check_postgres(config.store.url)] if config.store.url else []
    return [*found, *state, *stores, check_admin(config)]


async def graph_accepts_tokens(config: Config, network: Network | None = None) -> dict[str, Check]:
    """check_account for every account, through the daemon's TLS trust and proxies."""
    network = network or Network.from_environment(config.tls.ca_file)
    async with aiohttp.ClientSession(connector=network.connector()) as session:
        graph = GraphClient(
            session,
            config.graph.base_url,
            timeout=CONNECT_TIMEOUT,
            request_options=network.request_options(config.graph.base_url, config.graph.proxy),
        )
        sign_in = network.sign_in_session(config.graph.proxy)
        names = list(config.accounts)
        checks = await asyncio.gather(
            *(
                check_account(name, config.accounts[name], config, graph, sign_in=sign_in)
                for name in names
            )
        )
    return dict(zip(names, checks, strict=True))


async def check_account(
    name: str,
    account: AccountConfig,
    config: Config,
    graph: GraphClient,
    *,
    sign_in: HttpClient | None = None,
) -> Check:
    """A token from the account's source, then one GET that Graph answers only if it accepts
    the token: the id of a drive the account watches (or its own)."""
    subject = f"account {name}"
    provider = token_provider(name, account, config.state_dir, sign_in=sign_in)
    try:
        await provider.token()
    except AuthError as exc:
        return Check(subject, False, f"no token: {exc}")
    # The cheapest request that proves the token fits: the id of a drive the account watches
    # (or its own drive). An app-only token has no /me, so a drive of its own is asked for.
    drive = next((d for d in config.drives if d.account == name), None)
    path = drive.drive_path if drive is not None else "me/drive"
    url = f"{graph.base_url}/{path}?$select=id"
    try:
        await graph.get_json(url, provider.token)
    except GraphError as exc:
        where = f"drive {drive.name}" if drive is not None else "its own drive"
        return Check(subject, False, f"token obtained, but Graph refused it for {where}: {exc}")
    except (AuthError, InvalidGraphResponse, aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = describe_connection_error(exc) or _describe(exc)
        return Check(subject, False, f"token obtained, but GET /{path} failed: {reason}")
    return Check(subject, True, f"token accepted by Graph (GET /{path})")


async def check_webhook(name: str, webhook: WebhookConfig, network: Network) -> Check:
    subject = f"webhook {name}"
    parts = urlsplit(webhook.url)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    timeout = min(webhook.timeout, CONNECT_TIMEOUT)
    proxy = network.proxy(webhook.url, webhook.proxy)
    # The URL's path and query are not shown: webhook URLs often carry a token.
    where = f"{host}:{port}" + (f" through {proxy.display}" if proxy else "")
    try:
        async with asyncio.timeout(timeout):
            writer = await _connect(host, port, proxy)
            if secure:
                await writer.start_tls(network.ssl_context, server_hostname=host)
    except TimeoutError:
        return Check(subject, False, f"{where}: no answer within {timeout:g}s")
    except ssl.SSLCertVerificationError as exc:
        reason = f"{exc.verify_message} (tls.ca_file adds a CA)"
        return Check(subject, False, f"{where}: TLS certificate not trusted: {reason}")
    except (OSError, ssl.SSLError, _ProxyRefused) as exc:
        return Check(subject, False, f"{where}: cannot connect: {_describe(exc)}")
    writer.close()
    # Closing a connection opened only to see that it could be: its errors say nothing.
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return Check(subject, True, f"{where} answers" + (" (TLS certificate valid)" if secure else ""))


class _ProxyRefused(Exception):
    """The proxy answered CONNECT with something else than 200."""


async def _connect(host: str, port: int, proxy: Proxy | None) -> asyncio.StreamWriter:
    """A TCP connection to host:port, directly or through the proxy's CONNECT tunnel."""
    if proxy is None:
        _, writer = await asyncio.open_connection(host, port)
        return writer
    target = urlsplit(proxy.url)
    reader, writer = await asyncio.open_connection(target.hostname, target.port or 80)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    request += "".join(f"{name}: {value}\r\n" for name, value in proxy.headers.items())
    writer.write((request + "\r\n").encode())
    status = (await reader.readline()).decode("latin-1").split()
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass  # the rest of the proxy's answer head
    if len(status) < 2 or status[1] != "200":
        writer.close()
        raise _ProxyRefused(f"the proxy answered CONNECT with {' '.join(status[1:]) or 'nothing'}")
    return writer


def check_state_dir(state_dir: Path, *, sqlite: bool = True) -> list[Check]:
    subject = "state_dir"
    if not state_dir.exists():
        parent = next((p for p in state_dir.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return [Check(subject, True, f"{state_dir} will be created (mode 0700)")]
        return [Check(subject, False, f"{state_dir} does not exist and {parent} is not writable")]
    if not state_dir.is_dir():
        return [Check(subject, False, f"{state_dir} is not a directory")]
    checks = []
    mode = stat.S_IMODE(state_dir.stat().st_mode)
    if not os.access(state_dir, os.W_OK | os.X_OK):
        checks.append(Check(subject, False, f"{state_dir} is not writable by this user"))
    elif mode & 0o077:
        checks.append(
            Check(subject, False, f"{state_dir} is mode {mode:04o}; it holds tokens: chmod 0700")
        )
    else:
        checks.append(Check(subject, True, f"{state_dir} writable, mode {mode:04o}"))
    store = state_dir / OUTBOX_FILE
    if not sqlite:
        pass  # the store is PostgreSQL's: check_postgres
    elif store.exists():
        store_mode = stat.S_IMODE(store.stat().st_mode)
        if not os.access(store, os.R_OK | os.W_OK):
            checks.append(Check("store", False, f"{store} is not writable by this user"))
        elif store_mode & 0o077:
            checks.append(Check("store", False, f"{store} is mode {store_mode:04o}: chmod 0600"))
        else:
            checks.append(Check("store", True, f"{store} writable, mode {store_mode:04o}"))
    else:
        checks.append(Check("store", True, f"{store} will be created (mode 0600)"))
    return checks


async def check_postgres(url: str) -> Check:
    from relayd.store.postgres import probe  # asyncpg is loaded only when used

    try:
        return Check("store", True, await probe(url))
    except OutboxError as exc:
        return Check("store", False, str(exc))


def check_admin(config: Config) -> Check:
    subject = "admin"
    if not config.admin.enabled:
        return Check(subject, True, "admin.listen is off")
    host, port = config.admin.host, config.admin.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                pid = daemon_pid(config.state_dir)
                if pid is not None:
                    return Check(
                        subject, True, f"{config.admin.listen} held by the running relayd {pid}"
                    )
                return Check(subject, False, f"{config.admin.listen} is in use by another program")
            return Check(subject, False, f"{config.admin.listen}: {exc.strerror or exc}")
    return Check(subject, True, f"{config.admin.listen} is free")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
