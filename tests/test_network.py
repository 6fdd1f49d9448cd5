"""Which proxy each connection takes, the TLS trust they share, and what a failure says."""

from __future__ import annotations

import asyncio
import ssl
import textwrap
from pathlib import Path

import aiohttp
import pytest
import yaml
from support.configs import relay_document
from support.tls import Authority
from support.waiting import eventually, wait_until

from relayd import logs
from relayd.config import Config, ConfigError, parse_config
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.tls import throwaway_ca
from relayd.network import (
    Network,
    Proxy,
    ProxyEnv,
    choose_proxy,
    describe_connection_error,
    mask_proxy_url,
)
from relayd.supervisor import Supervisor
from relayd.watcher import DriveState

ENV = ProxyEnv(http="http://plain:3128", https="http://secure:3128", no_proxy="")


# ---- the proxy for a URL (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("https://graph.microsoft.com/v1.0/me", "http://secure:3128"),
        ("wss://push.example/socket.io/?EIO=4", "http://secure:3128"),
        ("http://hooks.internal/in", "http://plain:3128"),
        ("ws://127.0.0.1:9/socket.io/", "http://plain:3128"),
    ],
)
def test_the_environment_proxy_is_chosen_by_scheme(url: str, proxy: str) -> None:
    assert choose_proxy(url, setting=None, env=ENV) == proxy


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("hooks.internal", "https://hooks.internal/in", True),
        ("internal", "https://hooks.internal/in", True),  # a parent domain
        (".internal", "https://hooks.internal/in", True),
        ("hooks.internal", "https://other.example/in", False),
        ("ternal", "https://hooks.internal/in", False),  # not a suffix on a label boundary
        ("127.0.0.2", "https://127.0.0.2:8443/x", True),
        ("127.0.0.2", "https://127.0.0.1:8443/x", False),
        ("localhost:8443", "https://localhost:8443/x", True),
        ("localhost:8443", "https://localhost:9443/x", False),
        (" a.example , HOOKS.INTERNAL ", "https://hooks.internal/in", True),
        ("*", "https://anything.example/", True),
        ("[::1]:8443", "https://[::1]:8443/x", True),
    ],
)
def test_no_proxy_names_hosts_that_go_direct(no_proxy: str, url: str, direct: bool) -> None:
    env = ProxyEnv(https="http://secure:3128", http="http://plain:3128", no_proxy=no_proxy)
    assert (choose_proxy(url, setting=None, env=env) is None) is direct


def test_an_explicit_setting_overrides_the_environment_and_no_proxy() -> None:
    env = ProxyEnv(https="http://secure:3128", no_proxy="graph.microsoft.com")
    url = "https://graph.microsoft.com/v1.0"
    assert choose_proxy(url, setting="", env=env) is None  # "" means direct
    assert choose_proxy(url, setting="http://corp:8080", env=env) == "http://corp:8080"
    assert choose_proxy("https://x.example/", setting=None, env=ProxyEnv()) is None


def test_lower_case_variables_win_and_empty_ones_mean_unset() -> None:
    env = ProxyEnv.from_environ(
        {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "HTTP_PROXY": " "}
    )
    assert (env.https, env.http) == ("http://lower:2", None)
    assert ProxyEnv.from_environ({"NO_PROXY": "a,b"}).no_proxy == "a,b"


def test_proxy_credentials_travel_as_a_header_and_are_never_shown() -> None:
    proxy = Proxy.parse("http://relay:p%40ss@proxy.corp:3128")
    assert proxy.url == "http://proxy.corp:3128"
    assert proxy.headers == {"Proxy-Authorization": "Basic cmVsYXk6cEBzcw=="}  # relay:p@ss
    assert proxy.display == "http://***@proxy.corp:3128"
    assert "p%40ss" not in repr(proxy) and "cmVs" not in repr(proxy)
    assert mask_proxy_url("http://proxy:3128") == "http://proxy:3128"
    env = ProxyEnv.from_environ({"HTTPS_PROXY": "http://relay:hunter2@proxy:3128"})
    assert "hunter2" not in repr(env)
    assert logs.redact("via http://relay:hunter2@proxy:3128/") == "via http://***@proxy:3128/"


# ---- config -----------------------------------------------------------------------------------


def parse(text: str, base_dir: Path) -> Config:
    return parse_config(textwrap.dedent(text), filename="c.yaml", env={}, base_dir=base_dir)


def test_tls_and_proxy_settings_are_read(tmp_path: Path, ca: Authority) -> None:
    config = parse(
        f"""\
        tls: {{ca_file: {ca.ca_file.name}}}
        graph: {{proxy: "http://u:pw@proxy:3128"}}
        webhooks:
          direct: {{url: "https://h.example/in", proxy: ""}}
          inherit: {{url: "https://h.example/in"}}
        """,
        tmp_path,
    )
    assert config.tls.ca_file == tmp_path / "test-ca.pem"  # relative to the config's folder
    assert config.graph.proxy == "http://u:pw@proxy:3128"
    assert "pw" not in repr(config.graph)
    assert config.webhooks["direct"].proxy == ""
    assert config.webhooks["inherit"].proxy is None
    assert parse("{}", tmp_path).tls.ca_file is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        (b"not a certificate\n", "holds no PEM certificate"),
    ],
)
def test_a_missing_or_unusable_ca_file_is_a_config_error_naming_it(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "corp-ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        parse("tls: {ca_file: corp-ca.pem}", tmp_path)
    message = str(caught.value)
    assert "tls.ca_file" in message and str(path) in message and expected in message


def test_a_bad_proxy_url_is_refused_without_quoting_it(tmp_path: Path) -> None:
    for value in ("socks5://u:hunter2@p:1080", "http://u:hunter2@p:bad", "hunter2"):
        with pytest.raises(ConfigError) as caught:
            parse(f'graph: {{proxy: "{value}"}}', tmp_path)
        assert "graph.proxy" in str(caught.value)
        assert "hunter2" not in str(caught.value)


# ---- TLS trust ---------------------------------------------------------------------------------


async def test_the_shared_context_adds_the_ca_file_to_the_system_trust(
    ca: Authority, tls_emulator: GraphEmulator
) -> None:
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    network = Network.from_environment(ca.ca_file, env={})
    assert network.ssl_context.cert_store_stats()["x509_ca"] == system + 1
    via_env = Network.from_environment(None, env={"SSL_CERT_FILE": str(ca.ca_file)})
    for context in (network.ssl_context, via_env.ssl_context):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http,
            http.get(tls_emulator.base_url + "/me/drive/root/subscriptions/socketIo") as answer,
        ):
            assert answer.status == 401  # TLS is trusted; the missing token is refused


async def test_an_untrusted_certificate_is_described_with_its_host(
    tls_emulator: GraphEmulator,
) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError) as caught:
            await http.get(tls_emulator.base_url)
    text = describe_connection_error(caught.value)
    assert text is not None
    assert text.startswith(f"TLS certificate of 127.0.0.1:{tls_emulator.port} is not trusted: ")
    assert "tls.ca_file adds a CA" in text
    assert describe_connection_error(ValueError("other")) is None


async def test_a_relay_over_tls_with_the_ca_file_delivers_end_to_end(
    tmp_path: Path, ca: Authority, tls_emulator: GraphEmulator, tls_receiver: WebhookReceiver
) -> None:
    document = relay_document(
        tmp_path, tls_emulator, tls_receiver, tls={"ca_file": str(ca.ca_file)}
    )
    config = parse_config(yaml.safe_dump(document), filename="c.yaml", env={}, base_dir=tmp_path)
    supervisor = Supervisor(config)
    shutdown = asyncio.Event()
    task = asyncio.create_task(supervisor.run(shutdown))
    try:
        await wait_until(lambda: tls_emulator.connected("me") == 1, what="wss connected")
        assert tls_receiver.base_url.startswith("https://")
        await tls_emulator.emit("me")
        await wait_until(lambda: len(tls_receiver.received) == 1, what="https delivery")
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 15)


async def test_without_the_ca_the_drive_says_which_certificate_is_not_trusted(
    tmp_path: Path, tls_emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    document = relay_document(tmp_path, tls_emulator, receiver)
    config = parse_config(yaml.safe_dump(document), filename="c.yaml", env={}, base_dir=tmp_path)
    supervisor = Supervisor(config)
    shutdown = asyncio.Event()
    task = asyncio.create_task(supervisor.run(shutdown))
    try:
        await supervisor.started.wait()
        status = supervisor.watchers["d1"].status
        await wait_until(lambda: status.last_error is not None, what="a connect error")
        assert status.state is DriveState.RECONNECTING
        assert status.last_error == (
            f"TLS certificate of 127.0.0.1:{tls_emulator.port} is not trusted: "
            "unable to get local issuer certificate (tls.ca_file adds a CA)"
        )
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 15)


async def test_a_webhook_with_an_untrusted_certificate_fails_naming_its_host(
    tmp_path: Path, ca: Authority, tls_emulator: GraphEmulator
) -> None:
    other = throwaway_ca()  # the receiver's certificate comes from a CA relayd does not trust
    async with WebhookReceiver(ssl_context=other.server_context) as untrusted:
        document = relay_document(
            tmp_path, tls_emulator, untrusted, tls={"ca_file": str(ca.ca_file)}
        )
        config = parse_config(
            yaml.safe_dump(document), filename="c.yaml", env={}, base_dir=tmp_path
        )
        supervisor = Supervisor(config)
        shutdown = asyncio.Event()
        task = asyncio.create_task(supervisor.run(shutdown))
        try:
            await wait_until(lambda: tls_emulator.connected("me") == 1, what="wss connected")
            await tls_emulator.emit("me")
            assert supervisor.outbox is not None
            outbox = supervisor.outbox

            async def failed() -> bool:
                rows = await outbox.rows()
                return bool(rows) and rows[0]["last_error"] is not None

            await eventually(failed, what="a failed delivery")
            [row] = await outbox.rows()
            assert row["last_error"] == (
                f"TLS certificate of 127.0.0.1:{untrusted.port} is not trusted: "
                "unable to get local issuer certificate (tls.ca_file adds a CA)"
            )
            assert untrusted.requests == []
        finally:
            shutdown.set()
            await asyncio.wait_for(task, 15)


async def test_a_push_service_with_an_untrusted_certificate_fails_naming_its_host(
    tmp_path: Path, ca: Authority, tls_emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    # Graph is trusted; the notificationUrl points at a server whose CA relayd does not know.
    # python-socketio replaces the TLS error with "Connection error": the cause is still named.
    other = throwaway_ca()
    async with GraphEmulator(ssl_context=other.server_context) as push:
        tls_emulator.push_base_url = f"https://127.0.0.1:{push.port}"
        document = relay_document(
            tmp_path, tls_emulator, receiver, tls={"ca_file": str(ca.ca_file)}
        )
        config = parse_config(
            yaml.safe_dump(document), filename="c.yaml", env={}, base_dir=tmp_path
        )
        supervisor = Supervisor(config)
        shutdown = asyncio.Event()
        task = asyncio.create_task(supervisor.run(shutdown))
        try:
            await supervisor.started.wait()
            status = supervisor.watchers["d1"].status
            await wait_until(lambda: status.last_error is not None, what="a connect error")
            assert tls_emulator.endpoint_requests["me"] >= 1  # Graph itself was trusted
            assert status.last_error == (
                f"TLS certificate of 127.0.0.1:{push.port} is not trusted: "
                "unable to get local issuer certificate (tls.ca_file adds a CA)"
            )
        finally:
            shutdown.set()
            await asyncio.wait_for(task, 15)
