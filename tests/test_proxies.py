"""A real daemon behind a real proxy (tinyproxy), against the emulator over TLS with a test CA.

The emulator's push service is also reachable as a second host, 127.0.0.2 (a byte-for-byte
forwarder in front of the same TLS port), so the proxy's log tells the Graph API (127.0.0.1),
the socket (127.0.0.2) and the webhook (the receiver's port) apart.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.configs import FAST_RETRY, relay_document
from support.daemon import Daemon, free_port, write_daemon_config
from support.proxy import FreezableProxy
from support.tinyproxy import Tinyproxy
from support.tls import Authority
from support.waiting import eventually, wait_until

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.network import Network

PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ssl_cert_file")
PASSWORD = "hunter2-proxy-secret"
DEAD = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a proxy that is down


def child_env(**given: str) -> dict[str, str]:
    """This process's environment without any proxy or CA variable, plus `given`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    return {**env, **given}


@pytest.fixture
async def push_host(tls_emulator: GraphEmulator) -> AsyncIterator[FreezableProxy]:
    """The emulator's push service as 127.0.0.2: notificationUrls name that host."""
    forwarder = FreezableProxy(tls_emulator.port, host="127.0.0.2")
    await forwarder.start()
    tls_emulator.push_base_url = f"https://127.0.0.2:{forwarder.port}"
    try:
        yield forwarder
    finally:
        await forwarder.stop()


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Tinyproxy]:
    folder = tmp_path / "proxy"
    folder.mkdir()
    async with Tinyproxy(folder, credentials=("relay", PASSWORD)) as running:
        yield running


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        await daemon.stop()


async def start_daemon(
    daemons: list[Daemon],
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    env: dict[str, str],
    **top: Any,
) -> Daemon:
    port = free_port()
    folder = tmp_path / f"daemon{len(daemons)}"
    folder.mkdir()
    config = write_daemon_config(
        folder / "relayd.yaml",
        emulator,
        receiver,
        state_dir=folder / "state",
        admin_port=port,
        **top,
    )
    daemon = Daemon(config, port, env=env)
    daemons.append(daemon)
    await daemon.start()
    return daemon


async def drive_state(daemon: Daemon) -> dict[str, Any]:
    report = await daemon.status()
    drives: dict[str, Any] = report.get("drives", {})
    return drives.get("d1", {})


async def relays_one_notification(
    daemon: Daemon, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    async def connected() -> bool:
        return (await drive_state(daemon)).get("state") == "connected"

    await eventually(connected, timeout=30, what="the drive connected")
    await emulator.emit("me")
    await wait_until(lambda: len(receiver.received) == 1, timeout=20, what="a delivery")


@pytest.mark.timeout(90)
async def test_graph_socket_and_webhook_all_go_through_https_proxy(
    tmp_path: Path,
    ca: Authority,
    tls_emulator: GraphEmulator,
    push_host: FreezableProxy,
    tls_receiver: WebhookReceiver,
    proxy: Tinyproxy,
    daemons: list[Daemon],
) -> None:
    daemon = await start_daemon(
        daemons,
        tmp_path,
        tls_emulator,
        tls_receiver,
        child_env(HTTPS_PROXY=proxy.url),
        tls={"ca_file": str(ca.ca_file)},
    )
    await relays_one_notification(daemon, tls_emulator, tls_receiver)
    tunnels = set(proxy.tunnels())
    assert f"127.0.0.1:{tls_emulator.port}" in tunnels  # Graph's endpoint request
    assert f"127.0.0.2:{push_host.port}" in tunnels  # the wss socket
    assert f"127.0.0.1:{tls_receiver.port}" in tunnels  # the webhook delivery
    # The proxy's password went as a header; it is nowhere in what relayd shows.
    [started] = daemon.events("outbound proxies")
    assert started["https_proxy"] == f"http://***@127.0.0.1:{proxy.port}"
    _, status_text = await daemon.get("/status")
    assert PASSWORD not in daemon.log.read_text()
    assert PASSWORD not in status_text


@pytest.mark.timeout(90)
async def test_no_proxy_hosts_go_direct(
    tmp_path: Path,
    ca: Authority,
    tls_emulator: GraphEmulator,
    push_host: FreezableProxy,
    tls_receiver: WebhookReceiver,
    proxy: Tinyproxy,
    daemons: list[Daemon],
) -> None:
    env = child_env(https_proxy=proxy.url, no_proxy="127.0.0.2")
    daemon = await start_daemon(
        daemons, tmp_path, tls_emulator, tls_receiver, env, tls={"ca_file": str(ca.ca_file)}
    )
    await relays_one_notification(daemon, tls_emulator, tls_receiver)
    tunnels = set(proxy.tunnels())
    assert f"127.0.0.1:{tls_emulator.port}" in tunnels
    assert f"127.0.0.1:{tls_receiver.port}" in tunnels
    assert not [t for t in tunnels if t.startswith("127.0.0.2:")]  # the socket went direct
    assert push_host.accepted >= 1


@pytest.mark.timeout(90)
async def test_graph_proxy_and_a_webhook_proxy_override_the_environment(
    tmp_path: Path,
    ca: Authority,
    tls_emulator: GraphEmulator,
    push_host: FreezableProxy,
    tls_receiver: WebhookReceiver,
    proxy: Tinyproxy,
    daemons: list[Daemon],
) -> None:
    # The environment's proxy is down: anything that followed it would never connect.
    env = child_env(HTTPS_PROXY=DEAD, HTTP_PROXY=DEAD)
    webhook = {"url": tls_receiver.url("hook"), "retry": FAST_RETRY, "proxy": proxy.url}
    daemon = await start_daemon(
        daemons,
        tmp_path,
        tls_emulator,
        tls_receiver,
        env,
        tls={"ca_file": str(ca.ca_file)},
        graph={"base_url": tls_emulator.base_url, "proxy": ""},
        webhooks={"hook": webhook},
    )
    await relays_one_notification(daemon, tls_emulator, tls_receiver)
    assert set(proxy.tunnels()) == {f"127.0.0.1:{tls_receiver.port}"}  # the webhook only

    # `relayd status` asks the local admin server directly, whatever HTTP_PROXY says.
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "status",
        "--config",
        str(daemon.config),
        env={**env, "http_proxy": DEAD},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(cli.communicate(), 30)
    assert cli.returncode == 0, output.decode()
    assert "d1" in output.decode() and "connected" in output.decode()


@pytest.mark.timeout(90)
async def test_without_the_ca_the_drive_reports_the_untrusted_host_and_keeps_retrying(
    tmp_path: Path,
    ca: Authority,
    tls_emulator: GraphEmulator,
    receiver: WebhookReceiver,
    daemons: list[Daemon],
) -> None:
    daemon = await start_daemon(daemons, tmp_path, tls_emulator, receiver, child_env())
    expected = (
        f"TLS certificate of 127.0.0.1:{tls_emulator.port} is not trusted: "
        "unable to get local issuer certificate (tls.ca_file adds a CA)"
    )

    async def reported() -> bool:
        return (await drive_state(daemon)).get("last_error") == expected

    await eventually(reported, timeout=30, what="the certificate error in /status")
    assert (await drive_state(daemon))["state"] == "reconnecting"
    await wait_until(
        lambda: len(daemon.events("cannot connect, will retry")) >= 3, timeout=30, what="retries"
    )
    assert daemon.process is not None and daemon.process.returncode is None
    assert all(e["error"] == expected for e in daemon.events("cannot connect, will retry"))
    assert tls_emulator.endpoint_requests["me"] == 0  # refused at the handshake

    # The same CA given as SSL_CERT_FILE instead of tls.ca_file is trusted too.
    second = await start_daemon(
        daemons, tmp_path, tls_emulator, receiver, child_env(SSL_CERT_FILE=str(ca.ca_file))
    )
    await relays_one_notification(second, tls_emulator, receiver)


@pytest.mark.timeout(60)
async def test_msal_sign_in_trusts_the_ca_and_takes_the_same_proxy_choice(
    ca: Authority, tls_emulator: GraphEmulator, proxy: Tinyproxy
) -> None:
    """MSAL's http_client (a requests.Session) goes where Graph goes: through HTTPS_PROXY, or
    direct with `graph.proxy: ""`, trusting tls.ca_file either way."""
    url = tls_emulator.base_url + "/me/drive/root/subscriptions/socketIo"
    target = f"127.0.0.1:{tls_emulator.port}"

    def status_via(env: dict[str, str], setting: str | None) -> int:
        client = Network.from_environment(ca.ca_file, env=env).sign_in_session(setting)
        return int(client.get(url, timeout=10).status_code)

    through = await asyncio.to_thread(status_via, {"HTTPS_PROXY": proxy.url}, None)
    assert through == 401  # the emulator answered (no token): TLS trusted, tunnel made
    assert proxy.tunnels() == [target]

    direct = await asyncio.to_thread(status_via, {"HTTPS_PROXY": DEAD}, "")
    assert direct == 401
    assert proxy.tunnels() == [target]  # no second tunnel: it went direct

    bypass = await asyncio.to_thread(
        status_via, {"HTTPS_PROXY": DEAD, "NO_PROXY": "127.0.0.1"}, None
    )
    assert bypass == 401


@pytest.mark.timeout(60)
async def test_relayd_login_reaches_the_sign_in_service_through_the_proxy_trusting_the_ca(
    tmp_path: Path,
    ca: Authority,
    tls_emulator: GraphEmulator,
    receiver: WebhookReceiver,
    proxy: Tinyproxy,
) -> None:
    """`relayd login` (MSAL) talks to the account's authority, here the TLS emulator seen as
    127.0.0.2, through HTTPS_PROXY; the emulator answers MSAL's discovery with 404, so the
    command fails, but over a tunnel and a trusted certificate."""
    authority = FreezableProxy(tls_emulator.port, host="127.0.0.2")
    await authority.start()
    try:
        account = {"client_id": "00000000-0000-0000-0000-0000000000aa"}
        account["authority_host"] = f"https://127.0.0.2:{authority.port}"
        document = relay_document(
            tmp_path,
            tls_emulator,
            receiver,
            tls={"ca_file": str(ca.ca_file)},
            accounts={"work": account},
            drives=[{"name": "d2", "account": "work", "resource": "me", "webhook": "hook"}],
        )
        config = tmp_path / "relayd.yaml"
        config.write_text(yaml.safe_dump(document))
        cli = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relayd", "login", "work", "--config", str(config)),
            env=child_env(HTTPS_PROXY=proxy.url),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output = (await asyncio.wait_for(cli.communicate(), 40))[0].decode()
    finally:
        await authority.stop()
    assert cli.returncode == 1, output
    assert f"cannot use the sign-in service at https://127.0.0.2:{authority.port}" in output
    assert "certificate" not in output.lower()  # TLS to the authority was trusted
    assert f"127.0.0.2:{authority.port}" in proxy.tunnels()
