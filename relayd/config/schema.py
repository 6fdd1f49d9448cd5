"""The configuration's schema: frozen pydantic models, their field types and checks, and the
cross references between drives, accounts and webhooks. Pure: no file is read here but those a
field names (a secret_file, a CA file), and only when the loader asks for it."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
import shlex
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relayd.config.errors import Invalid, Invalids, Loc

# --------------------------------------------------------------------------- pure helpers

_DURATION_UNITS: Final = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER: Final = r"(?:\d+(?:\.\d*)?|\.\d+)"
# "ms" must be tried before "m"; parts may be separated by spaces ("1h 30m").
_DURATION_PART: Final = re.compile(rf"({_NUMBER})\s*(ms|d|h|m|s)\s*")
_DURATION_HELP: Final = (
    "expected a number of seconds or a string like '15s', '250ms', '2m', '1h30m' or '3d'"
)


def parse_duration(value: object, *, allow_zero: bool = False) -> float:
    """Return a duration in seconds.

    Accepts numbers (seconds) and strings: ``"15"``, ``"15.5"``, ``"250ms"``, ``"15s"``,
    ``"2m"``, ``"1h"``, ``"3d"`` and combinations with units from largest to smallest, such as
    ``"1h30m"``. Raises ``ValueError`` for garbage, negative durations and, unless
    ``allow_zero``, zero.
    """
    seconds = _duration_seconds(value)
    if seconds < 0:
        raise Invalid("duration must not be negative")
    if seconds == 0 and not allow_zero:
        raise Invalid("duration must be greater than zero")
    return seconds


_SIZE_UNITS: Final = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]iB|B)?", re.IGNORECASE)
_SIZE_HELP: Final = 'a number of bytes, or a number with KiB, MiB or GiB, e.g. "16MiB"'


def parse_size(value: object) -> int:
    """Return a size in bytes: ``16777216``, ``"512KiB"``, ``"16MiB"``, ``"1GiB"``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Invalid(f"invalid size {value!r}: {_SIZE_HELP}")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise Invalid(f"invalid size {value!r}: {_SIZE_HELP}")
        value = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    if value < 0:
        raise Invalid("size must not be negative")
    return int(value)


def _duration_seconds(value: object) -> float:
    invalid = Invalid(
        f"invalid duration {value!r}: {_DURATION_HELP}",
        redacted=f"invalid duration: {_DURATION_HELP}",
    )
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        seconds = _duration_text_seconds(text.removeprefix("-").lstrip())
        if seconds is None:
            raise invalid
        return sign * seconds
    try:
        seconds = float(value)
    except OverflowError:
        raise invalid from None
    if not math.isfinite(seconds):
        raise invalid
    return seconds


def _duration_text_seconds(text: str) -> float | None:
    """Seconds in "15", "1.5", "250ms" or "1h30m"; None if the text is not a duration."""
    if re.fullmatch(_NUMBER, text):
        return float(text)
    total = 0.0
    position = 0
    previous_scale = math.inf
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            return None
        scale = _DURATION_UNITS[part[2]]
        # Units must shrink: "1m30m" or "30m1h" are much more likely typos than intent.
        if scale >= previous_scale:
            return None
        total += float(part[1]) * scale
        previous_scale = scale
        position = part.end()
    return total if position else None


_RESOURCE_HELP: Final = (
    "expected me, drives/{drive-id}, groups/{group-id}, users/{user-id}, sites/{site-id}"
    " or sites/{site-id}/lists/{list-id}"
)


def _is_graph_id(text: str) -> bool:
    # Ids end up inside a URL path; "?" and "#" would cut it short, "." and ".." would walk it.
    return (
        bool(text)
        and text not in {".", ".."}
        and not any(char.isspace() or char in "/?#" for char in text)
    )


def resource_path(resource: str) -> str:
    """Return the Graph path of the drive behind a configured ``resource``.

    ``me`` -> ``me/drive``; ``drives/X`` -> ``drives/X``; ``groups/X``, ``users/X`` and
    ``sites/S`` (the site's default library) -> ``.../drive``; ``sites/S/lists/L`` ->
    ``sites/S/lists/L/drive``. Raises ``ValueError`` for anything else. Site ids may contain
    commas and dots (``contoso.sharepoint.com,{guid},{guid}``).
    """
    parts = resource.split("/")
    ids_ok = all(_is_graph_id(part) for part in parts[1::2])
    if parts == ["me"]:
        return "me/drive"
    if ids_ok and len(parts) == 2 and parts[0] == "drives":
        return resource
    if ids_ok and len(parts) == 2 and parts[0] in ("groups", "users", "sites"):
        return f"{resource}/drive"
    if ids_ok and len(parts) == 4 and parts[0] == "sites" and parts[2] == "lists":
        return f"{resource}/drive"
    raise Invalid(
        f"unsupported resource {resource!r}: {_RESOURCE_HELP}",
        redacted=f"unsupported resource: {_RESOURCE_HELP}",
    )


def drive_address(resource: str, drive_id: str | None) -> str:
    """Where relayd sends a drive's socketIo and delta requests: ``drives/{id}`` once the id is
    known (some business tenants refuse ``/me/drive/root/subscriptions/socketIo`` with 400
    notSupported while ``/drives/{id}/...`` works); ``resource`` itself until then."""
    return f"drives/{drive_id}" if drive_id else resource


def needs_lookup(resource: str) -> bool:
    """Every form but ``drives/{id}`` names its drive indirectly: its id is looked up once."""
    return not resource.startswith("drives/")


_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_HELP: Final = (
    "expected 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
)


def is_name(text: str) -> bool:
    """True for a valid drive, webhook or account name."""
    return _NAME.fullmatch(text) is not None


def _check_name(value: str) -> str:
    # Names appear in logs, metrics and file names under state_dir, hence the strict alphabet.
    if not _NAME.fullmatch(value):
        raise Invalid(
            f"invalid name {value!r}: {_NAME_HELP}", redacted=f"invalid name: {_NAME_HELP}"
        )
    return value


def _url_parts(value: str, problem: Invalid) -> urllib.parse.SplitResult:
    """`value` split into its parts; `problem` if it holds whitespace or a malformed port."""
    if any(char.isspace() for char in value):
        raise problem
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise problem from None
    return parts


def _check_http_url(value: str) -> str:
    # The URL itself is not quoted in the message: webhook URLs often embed a token.
    problem = Invalid("expected an http:// or https:// URL with a host")
    parts = _url_parts(value, problem)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise problem
    return value


_SECRET_PREFIX: Final = "whsec_"
_SECRET_HELP: Final = (
    "expected 'whsec_' followed by the base64 of 16 to 64 random bytes; "
    'generate one with: echo "whsec_$(openssl rand -base64 32)"'
)


def _check_secret(value: str) -> str:
    """Validate one webhook signing secret without ever quoting it."""
    secret = value.strip()
    if not secret:
        raise Invalid(f"secret is empty; {_SECRET_HELP}")
    body = secret.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(f"secret is not valid base64; {_SECRET_HELP}") from None
    if not 16 <= len(key) <= 64:
        raise Invalid(f"secret decodes to {len(key)} bytes; {_SECRET_HELP}")
    return secret


def _read_secret_file(path: Path) -> tuple[str, ...]:
    """Every whitespace-separated secret in ``path``, validated (several allow rotation)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise Invalid(f"cannot read {path}: not UTF-8 text") from None
    secrets = text.split()
    if not secrets:
        raise Invalid(f"{path} contains no secret; {_SECRET_HELP}")
    for number, secret in enumerate(secrets, start=1):
        try:
            _check_secret(secret)
        except Invalid as exc:
            raise Invalid(f"secret {number} of {len(secrets)} in {path}: {exc.message}") from None
    return tuple(secrets)


def _split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ``("127.0.0.1", 9464)``; IPv6 is written ``[::1]:9464``."""
    problem = Invalid(
        f"invalid listen address {listen!r}: expected host:port such as 127.0.0.1:9464 or "
        '[::1]:9464, or "" to turn the admin endpoint off',
        redacted="invalid listen address: expected host:port such as 127.0.0.1:9464 or "
        '[::1]:9464, or "" to turn the admin endpoint off',
    )
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", listen)
    if match is None:
        raise problem
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if match[1] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise problem from None
    if port > 65535:
        raise Invalid("port must be between 0 and 65535")
    return host, port


_RESERVED_HEADERS: Final = frozenset(
    {"content-length", "host", "transfer-encoding", "webhook-id", "webhook-signature",
     "webhook-timestamp"}
)  # fmt: skip
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_problems(headers: Mapping[str, str]) -> list[Invalid]:
    problems = []
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            problems.append(Invalid("not a valid HTTP header name", at=(name,)))
        elif name.lower() in _RESERVED_HEADERS:
            problems.append(Invalid("this header is set by relayd", at=(name,)))
        elif any(char in value for char in "\r\n\0"):
            problems.append(Invalid("header values must not contain line breaks", at=(name,)))
    return problems


# --------------------------------------------------------------------------- field types


def _duration(*, allow_zero: bool) -> BeforeValidator:
    def validate(value: object) -> float:
        return parse_duration(value, allow_zero=allow_zero)

    return BeforeValidator(validate)


_Duration = Annotated[float, _duration(allow_zero=False)]
_DurationOrZero = Annotated[float, _duration(allow_zero=True)]
_Size = Annotated[int, BeforeValidator(parse_size)]
_Name = Annotated[str, AfterValidator(_check_name)]
_HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
_GRAPH_VERSION: Final = re.compile(r"v\d+(\.\d+)?|beta")


def _check_proxy_url(value: str) -> str:
    # Not quoted in the message: a proxy URL may hold a password.
    if value == "":
        return value  # explicitly no proxy: go direct
    problem = Invalid('expected http://[user:password@]host[:port], or "" for no proxy')
    parts = _url_parts(value, problem)
    # aiohttp talks to a proxy in plain HTTP (CONNECT for https targets); an https:// proxy URL
    # would mean something else to it than to requests (sign-in), so only http:// is accepted.
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise problem
    return value


_ProxyUrl = Annotated[str, AfterValidator(_check_proxy_url)]
_Secret = Annotated[str, AfterValidator(_check_secret)]


def _as_tuple(value: object) -> object:
    """Let a single string stand for a one-element list."""
    return (value,) if isinstance(value, str) else value


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context if isinstance(info.context, Mapping) else {}


def _resolve_path(value: object, info: ValidationInfo) -> Path:
    """A path from the file; relative ones are relative to the config file's folder."""
    if isinstance(value, str):
        if not value.strip():
            raise Invalid("path must not be empty")
        if value.startswith("~"):
            raise Invalid("'~' is not expanded here; write ${HOME}/... or an absolute path")
        path = Path(value)
    elif isinstance(value, Path):
        path = value
    else:
        raise Invalid("expected a path")
    base_dir = _context(info).get("base_dir")
    return (base_dir if isinstance(base_dir, Path) else Path.cwd()) / path


@dataclass(frozen=True)
class _Rejected:
    """Stands in for a value a model-level step could not use, so that the field's own
    validator raises the problem and it is reported at that key (and its line)."""

    problem: Invalid


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    # Keys written with an empty value (``retry:``) mean "use the default", except where a
    # model says an empty value means something else.
    _null_means: ClassVar[Mapping[str, object]] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        # Unknown keys are kept, empty or not, so that they are reported.
        return {
            key: cls._null_means.get(key, value) if value is None else value
            for key, value in data.items()
            if value is not None or key in cls._null_means or key not in cls.model_fields
        }


class GraphConfig(_Model):
    base_url: _HttpUrl = "https://graph.microsoft.com/v1.0"
    # Endpoint fetches and socket connects, across all drives: at most this many at once, and
    # started at most this many per second, so thousands of drives starting (or coming back
    # after a network blip) never hammer Graph or the push service.
    connect_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 50
    connect_rate: Annotated[float, Field(gt=0, le=100_000)] = 50.0
    # Graph requests per tenant in any 60 s (docs/throttling.md): half of SharePoint's 1,200
    # resource units a minute for the smallest tenants, so relayd leaves room for other apps.
    requests_per_minute: Annotated[int, Field(ge=1, le=1_000_000)] = 600
    # The proxy for everything towards Microsoft (Graph, the push socket, sign-in): None follows
    # HTTPS_PROXY/HTTP_PROXY/NO_PROXY, "" goes direct. May hold a password: never shown.
    proxy: _ProxyUrl | None = Field(default=None, repr=False)

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        value = value.rstrip("/")
        # Every request path is appended to base_url: without the version, the first one
        # (".../me/drive/root/subscriptions/socketIo") would answer a puzzling 400 at run time.
        last = urllib.parse.urlsplit(value).path.rsplit("/", 1)[-1]
        if not _GRAPH_VERSION.fullmatch(last):
            raise Invalid(
                "must end with Graph's API version, e.g. https://graph.microsoft.com/v1.0"
            )
        return value


class TlsConfig(_Model):
    """Trust for every TLS connection relayd makes; the system's CAs always count."""

    # A PEM bundle of extra CAs (a corporate or test CA), read when the config is loaded.
    ca_file: Path | None = None

    @field_validator("ca_file", mode="before")
    @classmethod
    def _check_ca_file(cls, value: object, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _resolve_path(value, info)
        try:
            ssl.create_default_context().load_verify_locations(cafile=str(path))
        except ssl.SSLError:  # an OSError too: first
            raise Invalid(f"{path} holds no PEM certificate that can be used as a CA") from None
        except OSError as exc:
            raise Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
        return path


class AdminConfig(_Model):
    """The admin HTTP endpoint (health, metrics); ``listen: ""`` turns it off."""

    listen: str = "127.0.0.1:9464"

    _null_means: ClassVar[Mapping[str, object]] = {"listen": ""}

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value:
            _split_listen(value)
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    @property
    def host(self) -> str:
        """Host to bind (brackets removed from IPv6); only meaningful when ``enabled``."""
        return _split_listen(self.listen)[0] if self.listen else ""

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1] if self.listen else 0

    def local_url(self, port: int | None = None) -> str:
        """Where a command on this machine asks the admin server (`port`: the one it bound,
        when listen says 0): a wildcard address is asked on loopback."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port if port is None else port}"


def _default_replica() -> str:
    """hostname-pid: unique on a machine and across machines, and readable in /status."""
    return f"{socket.gethostname()[:50]}-{os.getpid()}"


class ClusterConfig(_Model):
    """Several replicas over one PostgreSQL store (docs/cluster.md)."""

    # This replica's name: the holder in the lease rows and its row in `replicas`. Each replica
    # needs its own (a Deployment's ${HOSTNAME} is the pod's name).
    replica: _Name = Field(default_factory=_default_replica)
    # A replica that stops renewing loses its drives after this: the longest a dead replica's
    # drives go unwatched (plus the connect time), against how long a PostgreSQL hiccup may
    # last before a healthy replica gives its drives up. Renewed every lease / 3.
    lease: Annotated[float, _duration(allow_zero=False), Field(ge=1.0, le=3600.0)] = 15.0


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


class OutboxConfig(_Model):
    delivered_retention: _DurationOrZero = 7 * 86400.0
    # Space kept free beside the store (a file of this size in state_dir, given up when the disk
    # fills), so that a full disk still lets what is stored be delivered. 0 turns it off.
    disk_reserve: _Size = 16 << 20


def _check_store_url(value: str) -> str:
    # Never quoted in a message: the URL may hold the database password.
    problem = Invalid(
        "expected postgresql://user[:password]@host[:port]/database (omit store.url for SQLite)"
    )
    parts = urllib.parse.urlsplit(value.strip())
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise problem from None
    query = urllib.parse.parse_qs(parts.query)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise problem
    if not parts.hostname and "host" not in query:  # ?host=/run/postgresql: a Unix socket
        raise problem
    return value.strip()


class StoreConfig(_Model):
    """Where notifications are kept: SQLite in state_dir (url omitted, the default) or a
    PostgreSQL database shared by every replica."""

    # A secret: it may hold the password (write ${PGPASSWORD}); never logged or shown whole.
    url: Annotated[str, AfterValidator(_check_store_url)] | None = Field(default=None, repr=False)


_GUID: Final = re.compile(r"[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}")
_TENANT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
# MSAL adds these itself and refuses them in an explicit scope list.
_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access"})
# Keys that only mean something for one kind of account, and the key that makes that kind.
_SOURCE_ONLY_KEYS: Final = {
    "tenant": "client_id",
    "authority_host": "client_id",
    "scopes": "client_id",
    "token_command_timeout": "token_command",
}
_KIND_OF_SOURCE: Final = {"client_id": "msal", "token_command": "command", "token_file": "file"}


class AccountConfig(_Model):
    """How relayd gets a delegated Graph token: exactly one of the three sources."""

    client_id: str | None = None
    tenant: str = "organizations"
    authority_host: _HttpUrl = "https://login.microsoftonline.com"
    scopes: tuple[str, ...] = ("Files.Read",)
    token_command: str | None = Field(default=None, repr=False)
    # How long one run of token_command may take before its process group is killed.
    token_command_timeout: _Duration = 60.0
    token_file: Path | None = None
    # Which tenant's Graph budget and throttling pause this account's requests share
    # (relayd/tenant.py's tenant_key): for accounts that do not name their tenant otherwise.
    throttle_tenant: str | None = None

    @property
    def kind(self) -> Literal["msal", "command", "file"]:
        if self.client_id is not None:
            return "msal"
        return "command" if self.token_command is not None else "file"

    @property
    def token_argv(self) -> tuple[str, ...]:
        """``token_command`` split like a shell would (no shell is involved)."""
        return tuple(shlex.split(self.token_command or ""))

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, value: str | None) -> str | None:
        if value is not None and not _GUID.fullmatch(value):
            raise Invalid(
                "expected the application (client) id, a GUID like "
                "00000000-0000-0000-0000-000000000000"
            )
        return value

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, value: str) -> str:
        if not _TENANT.fullmatch(value):
            raise Invalid(
                "expected common, organizations, consumers, a tenant id or a tenant domain"
            )
        return value

    @field_validator("throttle_tenant")
    @classmethod
    def _check_throttle_tenant(cls, value: str | None) -> str | None:
        if value is not None and not _TENANT.fullmatch(value):
            raise Invalid("expected a tenant id, a tenant domain or another plain name")
        return value

    @field_validator("authority_host")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: object) -> object:
        # OAuth writes scope lists space-separated, so "Files.Read Sites.Read.All" is accepted.
        return tuple(value.split()) if isinstance(value, str) else value

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise Invalid("at least one scope is required, e.g. Files.Read")
        for index, scope in enumerate(value):
            if not scope or any(char.isspace() for char in scope):
                raise Invalid("a scope must be a non-empty word", at=(index,))
            if scope.lower() in _RESERVED_SCOPES:
                raise Invalid(
                    f"{scope} is added by MSAL itself; remove it",
                    redacted="openid, profile and offline_access are added by MSAL itself",
                    at=(index,),
                )
        return value

    @field_validator("token_command")
    @classmethod
    def _check_token_command(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            # shlex's messages ("No closing quotation") never quote the command.
            raise Invalid(f"cannot split the command line: {exc}") from None
        if not argv:
            raise Invalid("the command must not be empty")
        return value

    @field_validator("token_file", mode="before")
    @classmethod
    def _resolve_token_file(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            return None
        path = _resolve_path(value, info)
        # The daemon reads the file at every token request, so a file that a sidecar writes
        # after the start is fine there; `check-config` asks for it to be readable now.
        if _context(info).get("check_files"):
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                problem = exc.strerror or type(exc).__name__
                raise Invalid(
                    f"cannot read {path}: {problem}", redacted=f"cannot read the file: {problem}"
                ) from None
        return path

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        sources = ("client_id", "token_command", "token_file")
        given = [key for key in sources if getattr(self, key) is not None]
        if len(given) != 1:
            found = f" (found {' and '.join(given)})" if given else ""
            raise Invalid(
                "set exactly one of client_id (device-code sign-in), token_command or "
                f"token_file{found}"
            )
        misplaced = [
            Invalid(f"only applies to {kind} accounts", at=(key,))
            for key, kind in _SOURCE_ONLY_KEYS.items()
            if key in self.model_fields_set and self.kind != _KIND_OF_SOURCE[kind]
        ]
        if misplaced:
            raise Invalids(misplaced)
        return self


class RetryConfig(_Model):
    initial_delay: _Duration = 5.0
    max_delay: _Duration = 3600.0
    max_age: _Duration = 3 * 86400.0

    @model_validator(mode="after")
    def _check_order(self) -> Self:
        if self.max_delay < self.initial_delay:
            raise Invalid("max_delay must not be shorter than initial_delay", at=("max_delay",))
        return self


class WebhookConfig(_Model):
    url: _HttpUrl
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    timeout: _Duration = 15.0
    # Every signing secret, from `secret` or read from `secret_file` at load time. The first
    # signs; all of them are sent during a rotation.
    secret: tuple[_Secret, ...] = Field(default=(), repr=False)
    secret_file: Path | None = None
    concurrency: int = Field(default=8, ge=1, le=256)
    ordered: bool = False
    retry: RetryConfig = RetryConfig()
    # This webhook's proxy: None follows HTTPS_PROXY/HTTP_PROXY/NO_PROXY, "" goes direct.
    proxy: _ProxyUrl | None = Field(default=None, repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        return self.secret

    @model_validator(mode="before")
    @classmethod
    def _load_secret_file(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping) or not isinstance(data.get("secret_file"), str | Path):
            return data  # nothing to read, or the field validator reports a wrong type
        data = dict(data)
        try:
            if data.get("secret") is not None:
                raise Invalid("set either secret or secret_file, not both")
            path = _resolve_path(data["secret_file"], info)
            data["secret"] = _read_secret_file(path)
            data["secret_file"] = path
        except Invalid as problem:
            data["secret_file"] = _Rejected(problem)
        return data

    @field_validator("secret_file", mode="before")
    @classmethod
    def _check_secret_file(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, _Rejected):
            raise value.problem
        return None if value is None else _resolve_path(value, info)

    @field_validator("secret", mode="before")
    @classmethod
    def _one_or_many_secrets(cls, value: object) -> object:
        return _as_tuple(value)

    @field_validator("headers", mode="before")
    @classmethod
    def _stringify_headers(cls, value: object) -> object:
        # YAML turns `X-Retries: 3` into an int and `X-Flag: yes` into a bool; headers are text.
        if not isinstance(value, Mapping):
            return value
        return {
            key: (str(item).lower() if isinstance(item, bool) else str(item))
            if isinstance(item, int | float)
            else item
            for key, item in value.items()
        }

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        problems = _header_problems(value)
        if problems:
            raise Invalids(problems)
        return value


class ChangesConfig(_Model):
    """How a drive in `mode: changes` turns notifications into delta rounds."""

    # true: the first start posts every item in the drive; false: it starts from "now".
    initial_sync: bool = False
    # driveItem fields to ask for ($select); empty: all of them.
    select: tuple[str, ...] = ()
    # items per POSTed body; a bigger page is split.
    max_items: Annotated[int, Field(ge=1, le=10_000)] = 200
    # a burst of notifications waits for this much quiet before one delta round ...
    quiet_period: _DurationOrZero = 2.0
    # ... but never longer than this after the first one, so a steady stream still flows.
    max_delay: _Duration = 30.0
    # a delta right after a notification can come back empty: look again this much later
    # (0 turns the follow-up round off).
    follow_up: _DurationOrZero = 10.0
    # the safety net under the push channel: a round when none ran for this long (jittered
    # down by up to a fifth, so drives started together do not poll together; 0 turns it off).
    poll_interval: _DurationOrZero = 3600.0

    @field_validator("select", mode="before")
    @classmethod
    def _one_or_many_fields(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return _as_tuple(value)


class DriveConfig(_Model):
    name: _Name
    account: str
    resource: str
    webhook: tuple[str, ...]
    # notifications: post each socketIo notification as it is (the default);
    # changes: follow notifications with delta queries and post the changed items.
    mode: Literal["notifications", "changes"] = "notifications"
    changes: ChangesConfig = ChangesConfig()

    @property
    def drive_path(self) -> str:
        """The Graph path of the drive, e.g. ``me/drive``."""
        return resource_path(self.resource)

    @field_validator("resource")
    @classmethod
    def _check_resource(cls, value: str) -> str:
        resource_path(value)
        return value

    @field_validator("webhook", mode="before")
    @classmethod
    def _one_or_many_webhooks(cls, value: object) -> object:
        return _as_tuple(value)

    @field_validator("webhook")
    @classmethod
    def _check_webhooks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise Invalid("name at least one webhook")
        for index, name in enumerate(value):
            if name in value[:index]:
                raise Invalid(
                    f"webhook {name!r} is listed twice",
                    redacted="webhook listed twice",
                    at=(index,),
                )
        return value


class Config(_Model):
    graph: GraphConfig = GraphConfig()
    tls: TlsConfig = TlsConfig()
    state_dir: Path = Field(default_factory=lambda: Path("state").absolute())
    shutdown_grace: _DurationOrZero = 5.0
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    outbox: OutboxConfig = OutboxConfig()
    store: StoreConfig = StoreConfig()
    accounts: dict[_Name, AccountConfig] = Field(default_factory=dict)
    webhooks: dict[_Name, WebhookConfig] = Field(default_factory=dict)
    drives: tuple[DriveConfig, ...] = ()
    cluster: ClusterConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_state_dir(cls, data: Any, info: ValidationInfo) -> Any:
        # Under systemd, StateDirectory= exports STATE_DIRECTORY (colon-separated when several
        # are configured; the first is ours). Without it, ./state in the working directory.
        if not isinstance(data, Mapping) or data.get("state_dir") is not None:
            return data
        env = _context(info).get("env", {})
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        return {**data, "state_dir": Path(state or "state").absolute()}

    @field_validator("state_dir", mode="before")
    @classmethod
    def _resolve_state_dir(cls, value: object, info: ValidationInfo) -> Path:
        return _resolve_path(value, info)

    @model_validator(mode="after")
    def _check_cluster_store(self) -> Self:
        # Replicas share drives, leases and the outbox through PostgreSQL; on SQLite each
        # replica would watch every drive and deliver from a file of its own.
        if self.cluster is not None and self.store.url is None:
            raise Invalids(
                [
                    Invalid(
                        "a cluster needs the PostgreSQL store: set store.url "
                        "(postgresql://...), or remove the cluster section to run one relayd "
                        "on SQLite",
                        at=("cluster",),
                    )
                ]
            )
        return self

    @model_validator(mode="after")
    def _check_references(self, info: ValidationInfo) -> Self:
        # parse_config checks the raw data instead (so these problems are reported together
        # with all others); this covers configurations built in code.
        if _context(info).get("references_checked"):
            return self
        drives = [
            _DriveRefs(index, drive.name, drive.account, tuple(enumerate(drive.webhook)))
            for index, drive in enumerate(self.drives)
        ]
        problems = _reference_problems(
            drives, self.accounts, self.webhooks, lambda i: f"drives[{i}]"
        )
        if problems:
            raise Invalids(problems)
        return self


# --------------------------------------------------------------------------- cross references


@dataclass(frozen=True)
class _DriveRefs:
    """What a drive refers to, taken from a model or from raw (not yet validated) data."""

    index: int
    name: object
    account: object
    webhooks: tuple[tuple[int | None, object], ...]  # (index in the list or None, name)


def _known(kind: str, names: Collection[str]) -> str:
    return f"known: {', '.join(sorted(names))}" if names else f"no {kind} are defined"


def _reference_problems(
    drives: Iterable[_DriveRefs],
    accounts: Collection[str] | None,
    webhooks: Collection[str] | None,
    first_at: Callable[[int], str],
) -> list[Invalid]:
    """Duplicate drive names and references to undefined accounts or webhooks.

    ``accounts``/``webhooks`` are None when that section is itself broken, in which case
    references to it are not checked (every drive would be reported otherwise).
    """
    problems: list[Invalid] = []
    first: dict[str, int] = {}
    for drive in drives:
        base: Loc = ("drives", drive.index)
        if isinstance(drive.name, str) and drive.name in first:
            where = first_at(first[drive.name])
            problems.append(
                Invalid(
                    f"duplicate drive name {drive.name!r} (first at {where})",
                    redacted=f"duplicate drive name (first at {where})",
                    at=(*base, "name"),
                )
            )
        elif isinstance(drive.name, str):
            first[drive.name] = drive.index
        references = [((*base, "account"), "account", accounts, drive.account)]
        references += [
            (
                (*base, "webhook") if index is None else (*base, "webhook", index),
                "webhook",
                webhooks,
                name,
            )
            for index, name in drive.webhooks
        ]
        for at, kind, known, name in references:
            if known is not None and isinstance(name, str) and name not in known:
                listing = _known(f"{kind}s", known)
                problems.append(
                    Invalid(
                        f"unknown {kind} {name!r} ({listing})",
                        redacted=f"unknown {kind} ({listing})",
                        at=at,
                    )
                )
    return problems


def raw_reference_problems(data: Mapping[str, object], lines: Mapping[Loc, int]) -> list[Invalid]:
    raw_drives = data.get("drives")
    drives = []
    for index, item in enumerate(raw_drives if isinstance(raw_drives, list) else []):
        if not isinstance(item, dict):
            continue
        webhook = item.get("webhook")
        webhooks: tuple[tuple[int | None, object], ...] = (
            ((None, webhook),) if not isinstance(webhook, list) else tuple(enumerate(webhook))
        )
        drives.append(_DriveRefs(index, item.get("name"), item.get("account"), webhooks))

    def section(key: str) -> Collection[str] | None:
        value = data.get(key)
        if value is None:
            return ()
        return value.keys() if isinstance(value, dict) else None

    def first_at(index: int) -> str:
        line = lines.get(("drives", index, "name"))
        return f"line {line}" if line is not None else f"drives[{index}]"

    return _reference_problems(drives, section("accounts"), section("webhooks"), first_at)
