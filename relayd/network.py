"""Outbound connections: which proxy a URL goes through, and the one TLS context they all trust.

Every connection relayd makes (Graph requests, the push service's WebSocket, webhook deliveries,
MSAL sign-in) asks this module two things: the client `ssl.SSLContext` (the system's trust plus
`tls.ca_file` and `SSL_CERT_FILE`, built once per process) and the proxy for its URL. The proxy
decision is pure: an explicit setting (`graph.proxy`, a webhook's `proxy`) wins, `""` meaning
direct; otherwise `HTTPS_PROXY`/`HTTP_PROXY` by scheme unless `NO_PROXY` names the host.
aiohttp's `trust_env` reads the same variables but has no per-connection override, so relayd
reads them here and passes the answer to every request.

Proxy URLs may carry credentials (`http://user:pass@proxy:3128`): they travel as a
`Proxy-Authorization` header and only the masked form (`http://***@proxy:3128`) is ever shown.
docs/network.md has the decisions.
"""

from __future__ import annotations

import asyncio.sslproto
import base64
import os
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import requests
import requests.adapters

from relayd.logs import redact

if TYPE_CHECKING:
    from relayd.auth import HttpClient

__all__ = [
    "Network",
    "Proxy",
    "ProxyEnv",
    "choose_proxy",
    "client_ssl_context",
    "describe_connection_error",
    "mask_proxy_url",
]

_HINT = "tls.ca_file adds a CA"


# ---- pure: the proxy for a URL ------------------------------------------------------------------


def mask_proxy_url(url: str) -> str:
    """A proxy URL with any user and password replaced by `***`; pure."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


@dataclass(frozen=True)
class ProxyEnv:
    """The proxy environment variables of the process, read once."""

    http: str | None = None
    https: str | None = None
    no_proxy: str = ""

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> ProxyEnv:
        """Lower case wins over upper case, as in curl and Python's urllib; pure."""

        def read(name: str) -> str | None:
            value = env.get(name.lower())
            if value is None:
                value = env.get(name.upper())
            return value.strip() or None if value is not None else None

        return cls(read("http_proxy"), read("https_proxy"), read("no_proxy") or "")

    def __repr__(self) -> str:  # the URLs may hold passwords
        shown = [mask_proxy_url(u) if u else None for u in (self.http, self.https)]
        return f"ProxyEnv(http={shown[0]!r}, https={shown[1]!r}, no_proxy={self.no_proxy!r})"


def choose_proxy(url: str, *, setting: str | None, env: ProxyEnv) -> str | None:
    """The proxy URL for a connection to `url`, or None to go direct; pure.

    `setting` is the config's explicit choice (None: not set): a URL, or "" for direct. It
    covers every host of its connections, so NO_PROXY does not apply to it. Without one,
    `https`/`wss` URLs take HTTPS_PROXY and `http`/`ws` URLs HTTP_PROXY, unless NO_PROXY matches
    the host (a name, a `.domain` suffix, `host:port`, or `*`).
    """
    if setting is not None:
        return setting or None
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme.lower() in ("https", "wss")
    proxy = env.https if secure else env.http
    if proxy is None:
        return None
    if bypasses(parts.hostname or "", parts.port, env.no_proxy):
        return None
    return proxy


def bypasses(host: str, port: int | None, no_proxy: str) -> bool:
    """True if NO_PROXY names `host`: `*`, the host itself, a parent domain (`example.com` or
    `.example.com` match `a.example.com`), optionally with `:port`; case-insensitive; pure.
    Addresses match literally (no CIDR ranges, as in Python's urllib)."""
    host = host.lower().rstrip(".")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, wanted = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
        if wanted and (port is None or str(port) != wanted):
            continue
        name = name.strip("[]").lstrip(".").rstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _has_port(entry: str) -> bool:
    """`host:port` or `[v6]:port`, not a bare IPv6 address."""
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isdigit() and (entry.count(":") == 1 or head.endswith("]"))


@dataclass(frozen=True)
class Proxy:
    """A proxy as aiohttp takes it: the URL without credentials, and the header carrying them."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    display: str = ""  # masked, safe to log

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urllib.parse.urlsplit(url)
        headers: dict[str, str] = {}
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, netloc = netloc.rpartition("@")
            user, _, password = userinfo.partition(":")
            pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        bare = urllib.parse.urlunsplit((parts.scheme, netloc, "", "", ""))
        return cls(bare, headers, mask_proxy_url(url))

    def request_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiohttp request or ws_connect through this proxy."""
        options: dict[str, Any] = {"proxy": self.url}
        if self.headers:
            options["proxy_headers"] = dict(self.headers)
        return options


# ---- TLS ----------------------------------------------------------------------------------------


def client_ssl_context(ca_file: Path | None, env: Mapping[str, str]) -> ssl.SSLContext:
    """The client context every connection shares: verified, with the system's CAs plus
    `ca_file` and `SSL_CERT_FILE` (explicitly added, so the extra CA counts whatever default
    paths this Python's OpenSSL was built with). Raises OSError/ssl.SSLError for a bad file."""
    context = ssl.create_default_context()
    extra = env.get("SSL_CERT_FILE")
    for path in (Path(extra) if extra else None, ca_file):
        if path is not None:
            context.load_verify_locations(cafile=str(path))
    return context


# What asyncio's TLS layer (SSLProtocol) allocates per connection to read into: 256 KiB by
# default, resident for as long as the connection lives. A relay holds one TLS socket per drive
# (plus pooled Graph connections), so that buffer was most of a drive's memory over wss (324 KiB
# per drive against 41 over plain ws; benchmarks/README.md). A TLS record carries at most 16 KiB
# of data, so reading 16 KiB at a time costs a large download only more loop iterations.
TLS_READ_BUFFER = 16 * 1024


def trim_tls_read_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Make asyncio's per-connection TLS read buffer `size` bytes, for connections opened from
    now on. Process-wide: called once by the daemon at start-up."""
    asyncio.sslproto.SSLProtocol.max_size = size


def _errors(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first: python-socketio and python-engineio replace
    aiohttp's error with a bare "Connection error" while it stays as the context."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def describe_connection_error(exc: BaseException) -> str | None:
    """A clear line for a TLS or proxy failure that names the host, or None for other errors;
    pure, and redacted (a proxy's credentials never show)."""
    for error in _errors(exc):
        if isinstance(error, aiohttp.ClientConnectorCertificateError):
            cause = error.certificate_error
            reason = getattr(cause, "verify_message", None) or str(cause)
            return redact(
                f"TLS certificate of {error.host}:{error.port} is not trusted: {reason} ({_HINT})"
            )
        if isinstance(error, aiohttp.ClientConnectorSSLError):
            return redact(f"TLS handshake with {error.host}:{error.port} failed: {error.os_error}")
        if isinstance(error, aiohttp.ClientProxyConnectionError):
            return redact(
                f"cannot reach the proxy {error.host}:{error.port}: "
                f"{error.strerror or error.os_error}"
            )
        if isinstance(error, aiohttp.ClientHttpProxyError):
            return redact(f"the proxy refused the connection: {error.status} {error.message}")
    return None


# ---- what one process shares --------------------------------------------------------------------


class _TrustingAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with relayd's SSL context, also through a proxy's tunnel.

    requests would otherwise verify against certifi's bundle (loaded into the context on each
    connection), which knows neither tls.ca_file nor the system's CAs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("ssl_context", self._context)
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        if verify is True:  # our context holds the trust; no certifi bundle on top of it
            conn.ca_certs = None
            conn.ca_cert_dir = None


class _SignInSession(requests.Session):
    """The requests.Session MSAL signs in with: relayd's trust, and relayd's proxy choice for
    each URL (the environment is read once, by Network, not by requests on every call)."""

    def __init__(self, network: Network, setting: str | None) -> None:
        super().__init__()
        self.trust_env = False  # no REQUESTS_CA_BUNDLE, .netrc or proxy variables of its own
        self._network = network
        self._setting = setting
        adapter = _TrustingAdapter(network.ssl_context)
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        proxy = choose_proxy(str(url), setting=self._setting, env=self._network.env)
        scheme = urllib.parse.urlsplit(str(url)).scheme
        settings["proxies"] = {scheme: proxy} if proxy else {}
        return settings


class Network:
    """The SSL context and proxy environment of one process; built once, shared by all."""

    def __init__(self, ssl_context: ssl.SSLContext, env: ProxyEnv) -> None:
        self.ssl_context = ssl_context
        self.env = env

    @classmethod
    def from_environment(
        cls, ca_file: Path | None, env: Mapping[str, str] | None = None
    ) -> Network:
        env = os.environ if env is None else env
        return cls(client_ssl_context(ca_file, env), ProxyEnv.from_environ(env))

    def summary(self) -> dict[str, str | None]:
        """What the environment says, masked: for the start-up log line."""
        return {
            "https_proxy": mask_proxy_url(self.env.https) if self.env.https else None,
            "http_proxy": mask_proxy_url(self.env.http) if self.env.http else None,
            "no_proxy": self.env.no_proxy or None,
        }

    def proxy(self, url: str, setting: str | None) -> Proxy | None:
        chosen = choose_proxy(url, setting=setting, env=self.env)
        return Proxy.parse(chosen) if chosen else None

    def request_options(self, url: str, setting: str | None) -> dict[str, Any]:
        """aiohttp keyword arguments for requests to `url` (all of one origin)."""
        proxy = self.proxy(url, setting)
        return proxy.request_options() if proxy else {}

    def connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """A connector whose TLS connections trust what this process trusts."""
        return aiohttp.TCPConnector(ssl=self.ssl_context, **kwargs)

    def sign_in_session(self, setting: str | None) -> HttpClient:
        """A requests.Session for MSAL (`http_client`), with `graph.proxy` as `setting`."""
        return cast("HttpClient", _SignInSession(self, setting))
