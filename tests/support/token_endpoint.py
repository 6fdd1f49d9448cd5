"""A fake Microsoft identity platform that MSAL talks to in-process: sign-in without a network.

`FakeLoginService.http_client()` returns an object shaped like the `requests.Session` that MSAL
uses by default (`get(url, **kw)` / `post(url, **kw)` returning responses with `status_code`,
`text`, `headers` and `raise_for_status()`), so every request of the real MSAL code paths lands
here: OpenID discovery, `/devicecode`, and `/token` for the device-code grant (answering
`authorization_pending` first, as a person who has not typed the code yet) and the refresh-token
grant (rolling the refresh token on every use, like Entra ID does).

Nothing leaves the process. The default authority host is 127.0.0.1 on the discard port, so even a
request that somehow bypassed the injected client could not reach beyond this machine, and any
request for a host or path the fake does not serve is recorded in `unexpected` and answered 404
(tests assert the list is empty).

Access tokens are JWT-shaped (header.payload.signature with `exp`), unsigned in any meaningful
sense: relayd only reads their expiry. ID tokens carry preferred_username/oid/tid and responses
carry `client_info`, which is what MSAL needs to record an account in its cache.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEVICE_CODE_GRANT",
    "FAKE_AUTHORITY_HOST",
    "FakeHttpClient",
    "FakeLoginService",
    "FakeResponse",
    "User",
]

FAKE_AUTHORITY_HOST = "https://127.0.0.1:9"
TENANT_ID = "72f988bf-0000-4000-8000-00000000cafe"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(claims: Mapping[str, object]) -> str:
    """A token with the shape of a JWT; the signature is random bytes."""
    header = {"typ": "JWT", "alg": "RS256", "kid": "fake-login-service"}
    return ".".join(
        (
            _b64(json.dumps(header).encode()),
            _b64(json.dumps(dict(claims)).encode()),
            _b64(secrets.token_bytes(32)),
        )
    )


@dataclass(frozen=True)
class User:
    """A person who can sign in."""

    username: str
    oid: str = field(default_factory=lambda: str(uuid.uuid4()))
    tid: str = TENANT_ID


class FakeHTTPError(Exception):
    """What `raise_for_status()` raises, like requests.HTTPError."""


@dataclass
class FakeResponse:
    status_code: int
    text: str
    headers: dict[str, str] = field(default_factory=dict)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise FakeHTTPError(f"HTTP {self.status_code}")


@dataclass
class _DeviceCode:
    client_id: str
    scopes: tuple[str, ...]
    polls_left: int  # authorization_pending answers before the person has "signed in"
    outcome: str | None  # None: success; else the OAuth error to answer once pending is over


@dataclass
class _RefreshToken:
    user: User
    client_id: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Call:
    """One request MSAL made: method, path and, for /token, the grant type."""

    method: str
    path: str
    grant_type: str | None = None


class FakeLoginService:
    """The login service's state and behaviour; thread-safe (MSAL runs in worker threads)."""

    def __init__(
        self,
        host: str = FAKE_AUTHORITY_HOST,
        *,
        user: User | None = None,
        access_lifetime: int = 3600,
        pending_polls: int = 1,
    ) -> None:
        self.host = host.rstrip("/")
        # Who signs in at the next device-code flow; tests switch it between logins.
        self.user = user or User("ada@contoso.example")
        # Lifetime of access tokens issued from now on. Under five minutes, MSAL treats a token
        # as due for refresh at once, which is how tests reach "near expiry" without waiting.
        self.access_lifetime = access_lifetime
        self.pending_polls = pending_polls
        # The device-code flow ends with this OAuth error instead of tokens (e.g. "expired_token").
        self.device_flow_outcome: str | None = None
        # While true, /token answers 503 (an outage of the sign-in service).
        self.outage = False
        self.calls: list[Call] = []
        self.unexpected: list[str] = []
        self.issued_access_tokens: list[str] = []
        self.issued_refresh_tokens: list[str] = []
        # Set while a refresh-token grant waits at the gate of hold_refreshes().
        self.refresh_waiting = threading.Event()
        self._gate: threading.Event | None = None
        # Called with every access token issued (e.g. to teach a Graph emulator to accept it).
        self.on_access_token: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._device_codes: dict[str, _DeviceCode] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._serial = itertools.count(1)

    # ---- knobs ---------------------------------------------------------------------------------

    def revoke(self, username: str) -> None:
        """Make every refresh token of `username` invalid (a password change, a revoked session)."""
        with self._lock:
            for key in [
                k for k, rt in self._refresh_tokens.items() if rt.user.username == username
            ]:
                del self._refresh_tokens[key]

    def hold_refreshes(self) -> threading.Event:
        """Make refresh-token grants wait until the returned event is set.

        The wait happens in the thread MSAL runs in, outside the service's lock, so a test can
        check what the rest of the program does meanwhile.
        """
        self.refresh_waiting.clear()
        self._gate = threading.Event()
        return self._gate

    def grants(self, grant_type: str) -> int:
        """How many /token requests of this grant type MSAL has made."""
        return sum(1 for call in self.calls if call.grant_type == grant_type)

    def http_client(self) -> FakeHttpClient:
        return FakeHttpClient(self)

    # ---- the endpoints -------------------------------------------------------------------------

    def handle(self, method: str, url: str, data: Mapping[str, Any] | None) -> FakeResponse:
        parts = urllib.parse.urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        segments = parts.path.strip("/").split("/")
        form = {key: str(value) for key, value in (data or {}).items()}
        gate = self._gate
        if gate is not None and form.get("grant_type") == "refresh_token":
            self.refresh_waiting.set()
            if not gate.wait(timeout=10):
                raise AssertionError("the test never released the held refresh")
        with self._lock:
            self.calls.append(Call(method, parts.path, form.get("grant_type")))
            if origin != self.host or len(segments) < 2:
                return self._unexpected(method, url)
            tenant, rest = segments[0], "/".join(segments[1:])
            if method == "GET" and rest == "v2.0/.well-known/openid-configuration":
                return self._discovery(tenant)
            if method == "POST" and rest == "oauth2/v2.0/devicecode":
                return self._device_code(form)
            if method == "POST" and rest == "oauth2/v2.0/token":
                if self.outage:
                    return FakeResponse(503, "Service Unavailable", {"Content-Type": "text/plain"})
                return self._token(tenant, form)
            return self._unexpected(method, url)

    def _unexpected(self, method: str, url: str) -> FakeResponse:
        self.unexpected.append(f"{method} {url}")
        return FakeResponse(404, json.dumps({"error": "not_found"}))

    def _discovery(self, tenant: str) -> FakeResponse:
        base = f"{self.host}/{tenant}"
        return _json(
            200,
            {
                "issuer": f"{self.host}/{TENANT_ID}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            },
        )

    def _device_code(self, form: Mapping[str, str]) -> FakeResponse:
        scopes = tuple(form.get("scope", "").split())
        if "offline_access" not in scopes:
            # Without offline_access there is no refresh token, and no sign-in lasting months.
            return _oauth_error("invalid_scope", "offline_access was not requested")
        code = secrets.token_urlsafe(16)
        user_code = f"FAKE{next(self._serial):04d}"
        self._device_codes[code] = _DeviceCode(
            form["client_id"], scopes, self.pending_polls, self.device_flow_outcome
        )
        return _json(
            200,
            {
                "device_code": code,
                "user_code": user_code,
                "verification_uri": f"{self.host}/devicelogin",
                "expires_in": 900,
                # Zero: MSAL polls again at once, so a test never waits on a polling interval.
                "interval": 0,
                "message": (
                    f"To sign in, use a web browser to open the page {self.host}/devicelogin "
                    f"and enter the code {user_code} to authenticate."
                ),
            },
        )

    def _token(self, tenant: str, form: Mapping[str, str]) -> FakeResponse:
        grant = form.get("grant_type")
        if grant == DEVICE_CODE_GRANT:
            pending = self._device_codes.get(form.get("device_code", ""))
            if pending is None or pending.client_id != form.get("client_id"):
                return _oauth_error("invalid_grant", "AADSTS70000: unknown device code", 70000)
            if pending.polls_left > 0:
                pending.polls_left -= 1
                return _oauth_error("authorization_pending", "AADSTS70016: pending", 70016)
            del self._device_codes[form["device_code"]]
            if pending.outcome is not None:
                return _oauth_error(
                    pending.outcome, f"the device-code flow ended: {pending.outcome}"
                )
            return self._tokens(self.user, pending.client_id, pending.scopes)
        if grant == "refresh_token":
            refresh = self._refresh_tokens.pop(form.get("refresh_token", ""), None)
            if refresh is None or refresh.client_id != form.get("client_id"):
                return _oauth_error(
                    "invalid_grant",
                    "AADSTS700082: The refresh token has expired due to inactivity.",
                    700082,
                )
            scopes = tuple(form.get("scope", "").split()) or refresh.scopes
            return self._tokens(refresh.user, refresh.client_id, scopes)
        return _oauth_error("unsupported_grant_type", f"grant {grant!r} is not supported")

    def _tokens(self, user: User, client_id: str, scopes: tuple[str, ...]) -> FakeResponse:
        now = int(time.time())
        serial = next(self._serial)
        granted = [scope for scope in scopes if scope not in _RESERVED_SCOPES]
        access_token = make_jwt(
            {
                "aud": "https://graph.microsoft.com",
                "iss": f"https://sts.fake/{user.tid}/",
                "iat": now,
                "exp": now + self.access_lifetime,
                "upn": user.username,
                "oid": user.oid,
                "tid": user.tid,
                "scp": " ".join(granted),
                "uti": f"at-{serial}",
            }
        )
        id_token = make_jwt(
            {
                "aud": client_id,
                "iss": f"{self.host}/{user.tid}/v2.0",
                "iat": now,
                "exp": now + 3600,
                "sub": f"sub-{user.oid}",
                "oid": user.oid,
                "tid": user.tid,
                "preferred_username": user.username,
                "name": user.username.split("@")[0].title(),
            }
        )
        refresh_token = f"rt-{serial}-{secrets.token_urlsafe(24)}"
        self._refresh_tokens[refresh_token] = _RefreshToken(user, client_id, scopes)
        self.issued_refresh_tokens.append(refresh_token)
        self.issued_access_tokens.append(access_token)
        if self.on_access_token is not None:
            self.on_access_token(access_token)
        return _json(
            200,
            {
                "token_type": "Bearer",
                "scope": " ".join([*granted, "openid", "profile"]),
                "expires_in": self.access_lifetime,
                "ext_expires_in": self.access_lifetime,
                "access_token": access_token,
                "refresh_token": refresh_token,
                "id_token": id_token,
                "client_info": _b64(json.dumps({"uid": user.oid, "utid": user.tid}).encode()),
            },
        )


class FakeHttpClient:
    """The `http_client` MSAL is given: a requests-like facade over a FakeLoginService."""

    def __init__(self, service: FakeLoginService) -> None:
        self.service = service

    def get(self, url: str, params: Mapping[str, Any] | None = None, **_: Any) -> FakeResponse:
        if params:
            url = f"{url}?{urllib.parse.urlencode(params)}"
        return self.service.handle("GET", url, None)

    def post(
        self, url: str, params: Mapping[str, Any] | None = None, data: Any = None, **_: Any
    ) -> FakeResponse:
        if params:
            url = f"{url}?{urllib.parse.urlencode(params)}"
        return self.service.handle("POST", url, data if isinstance(data, Mapping) else None)

    def close(self) -> None:
        """MSAL may close its client; there is nothing to release."""


def _json(status: int, body: Mapping[str, object]) -> FakeResponse:
    return FakeResponse(status, json.dumps(dict(body)), {"Content-Type": "application/json"})


def _oauth_error(error: str, description: str, code: int | None = None) -> FakeResponse:
    body: dict[str, object] = {"error": error, "error_description": description}
    if code is not None:
        body["error_codes"] = [code]
    return _json(400, body)
