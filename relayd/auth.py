"""Bearer tokens for Graph, one provider per configured account.

Every drive of an account shares its provider, so a 401 seen by many drives at once refreshes the
token once: callers pass the token that was refused, and a provider that already holds a newer one
just hands it out.

Three sources: `token_command`, `token_file`, and device-code sign-in with MSAL (`client_id`
accounts). For the last, `relayd login` stores MSAL's token cache under state_dir, one file per
account; the daemon refreshes silently from it for as long as the refresh token lasts (it rolls on
every use), and picks up a new `relayd login` without a restart. Nothing here logs a token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import msal
import structlog

from relayd.config import AccountConfig
from relayd.logs import TOKEN_ALPHABET, mask_opaque
from relayd.waiting import within

log = structlog.get_logger("relayd.auth")

# Refresh this long before a token's own expiry, so a request never leaves with a token that
# expires on the way.
EXPIRY_MARGIN = 300.0
# Opaque (non-JWT) tokens carry no expiry; Graph's access tokens live 60-90 minutes.
OPAQUE_TOKEN_LIFETIME = 45 * 60.0


class AuthError(Exception):
    """An account cannot produce a token now. The message is safe to log."""

    def __init__(self, message: str, *, needs_login: bool = False) -> None:
        super().__init__(message)
        self.needs_login = needs_login


class TokenProvider(Protocol):
    async def token(self, refused: str | None = None) -> str:
        """A bearer token; `refused` is a token Graph just answered 401 to."""
        ...


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, or None when the token is not a readable JWT.

    Only read, never verified: they decide when to fetch a new token and what `relayd accounts`
    shows, nothing more.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (Unix seconds) of a JWT, or None when the token is not a readable JWT."""
    exp = (jwt_claims(token) or {}).get("exp")
    return float(exp) if isinstance(exp, int | float) else None


# ---- what a token source produced: checked and described without ever quoting it ----------

_BEARER_TOKEN = re.compile(f"[{TOKEN_ALPHABET}]+")
# Terminal escapes and other control characters: tools colour their errors.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")
# At most this much of a command's stderr line reaches the AuthError (logs, /status).
STDERR_SHOWN = 200


class TokenProblem(Enum):
    """Why a token source's output cannot be a bearer token; `.value` never quotes it."""

    EMPTY = "gave no token"
    LINES = "printed more than one line"
    CHARACTERS = "contains characters that cannot be a bearer token"


def token_problem(output: str) -> TokenProblem | None:
    """What is wrong with `output` as a bearer token, or None when it is one; pure.

    Whitespace around it (a trailing newline) is fine; anything inside must be b64token.
    """
    text = output.strip()
    if not text:
        return TokenProblem.EMPTY
    if len(text.splitlines()) > 1:
        return TokenProblem.LINES
    if not _BEARER_TOKEN.fullmatch(text):
        return TokenProblem.CHARACTERS
    return None


def stderr_summary(stderr: str, secrets: Iterable[str | None] = ()) -> str:
    """The first non-empty line of a command's stderr, redacted and capped; pure.

    Only the first line: later lines are where tools dump responses and stack traces. Redacted
    before it is capped, so a cut never leaves the visible half of a token behind.
    """
    for line in stderr.splitlines():
        shown = " ".join(mask_opaque(_CONTROL.sub("", line), secrets).split())
        if shown:
            return shown if len(shown) <= STDERR_SHOWN else shown[: STDERR_SHOWN - 3] + "..."
    return "nothing on stderr"


class _CachingProvider(ABC):
    """Keeps one token until it is refused or near its expiry; `_fetch` gets a new one."""

    def __init__(self, account: str) -> None:
        self.account = account
        self._lock = asyncio.Lock()
        self._token: str | None = None  # the last good token, also while the source fails
        self._refresh_at = 0.0
        self.refreshes = 0  # tokens taken from the source (the relayd_token_refreshes metric)

    async def token(self, refused: str | None = None) -> str:
        async with self._lock:
            current = self._token
            fresh = current is not None and time.time() < self._refresh_at
            if current is not None and fresh and current != refused:
                return current
            output = await self._fetch()
            problem = token_problem(output)
            if problem is not None:
                raise AuthError(f"account {self.account!r}: {self._explain(problem)}")
            token = output.strip()
            expiry = jwt_expiry(token)
            lifetime = OPAQUE_TOKEN_LIFETIME if expiry is None else expiry - time.time()
            self._token = token
            self._refresh_at = time.time() + max(0.0, lifetime - EXPIRY_MARGIN)
            self.refreshes += 1
            return token

    @abstractmethod
    async def _fetch(self) -> str:
        """Get a new token from the source: its raw output, checked by `token`."""

    @abstractmethod
    def _explain(self, problem: TokenProblem) -> str:
        """The problem with the source's output, naming the source (never quoting the output)."""


# A token is a few KiB; more than this on stdout or stderr is not kept (memory stays bounded
# whatever the command does).
COMMAND_OUTPUT_LIMIT = 64 * 1024
# After the command exited, how long its pipes may stay open: something it started in the
# background may hold them (and never close them); what the command wrote is read by then.
PIPE_GRACE = 2.0
# After SIGKILL, how long to wait for the process to be reported dead before giving up on it.
KILL_GRACE = 5.0


class _CommandOutput(asyncio.SubprocessProtocol):
    """Collects a command's stdout and stderr (bounded) and says when it exited and when both
    pipes reached EOF: two separate moments, since a child it started can hold the pipes."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self.data: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.overflow = False
        self._open = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buffer = self.data[fd]
        room = COMMAND_OUTPUT_LIMIT - len(buffer)
        buffer += data[: max(0, room)]
        if len(data) > room:
            self.overflow = True

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    @property
    def finished(self) -> bool:
        """The command exited and nothing holds its pipes any more."""
        return self.exited.done() and self.pipes_closed.done()


def _kill_group(pgid: int) -> None:
    """SIGKILL a command's whole process group: the shell and whatever it started."""
    # ESRCH: every member is gone already. EPERM: a member changed its uid; nothing more to do.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "did not report how it ended"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was ended by {signal.Signals(-returncode).name}"
        return f"was ended by signal {-returncode}"
    return f"exited {returncode}"


class CommandTokenProvider(_CachingProvider):
    """Runs `token_command` (split like a shell would, run without one); stdout is the token.

    The command runs in a session (so a process group) of its own: on a timeout, or when the
    fetch is cancelled (shutdown), the whole group is killed, not just the command, so a shell
    wrapper's children neither hang relayd on their open pipes nor outlive it. Its output is never
    shown; a failure is reported with its exit code and its first stderr line, redacted.
    """

    def __init__(self, account: str, command: str, *, timeout: float = 60.0) -> None:
        super().__init__(account)
        self._argv = shlex.split(command)
        self._timeout = timeout

    @classmethod
    def from_config(cls, name: str, account: AccountConfig) -> CommandTokenProvider:
        assert account.token_command is not None  # only called for token_command accounts
        return cls(name, account.token_command, timeout=account.token_command_timeout)

    async def _fetch(self) -> str:
        output = _CommandOutput()
        try:
            transport = await self._spawn(output)
        except OSError as exc:
            raise AuthError(
                f"account {self.account!r}: token_command {self._argv[0]!r} cannot run: "
                f"{exc.strerror}"
            ) from None
        pgid = transport.get_pid()  # a session leader's pid is its process group's id
        try:
            await self._wait(output, pgid)
        finally:
            # Whatever ended the wait (an exit, the timeout, a cancellation): a group that has
            # not finished is killed, and the pipes are closed rather than waited for.
            if not output.finished:
                _kill_group(pgid)
            transport.close()
        return self._result(output, transport.get_returncode())

    async def _spawn(self, output: _CommandOutput) -> asyncio.SubprocessTransport:
        """Start the command; a cancellation meanwhile lets the start finish, then kills it.

        asyncio's own handling of a cancelled start kills the command alone and then waits for
        its pipes to close: a wrapper's child that holds them (`sleep 600 &` in a shell) would
        hang the cancelled fetch, and so relayd's shutdown, until that child exits. A start
        takes milliseconds, so it is left to complete and the whole group is killed instead.
        """
        loop = asyncio.get_running_loop()
        spawn = asyncio.ensure_future(
            loop.subprocess_exec(
                lambda: output,
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        )
        try:
            transport, _ = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # a start that failed left nothing running
                transport, _ = await spawn
                _kill_group(transport.get_pid())
                try:
                    # Killed, so its exit is a moment away: waiting for it lets asyncio reap the
                    # command before its transport is closed (no zombie, no ResourceWarning).
                    await within(asyncio.shield(output.exited), KILL_GRACE)
                finally:
                    transport.close()
            raise
        return transport

    async def _wait(self, output: _CommandOutput, pgid: int) -> None:
        """Wait for the command's exit (bounded by the timeout), then briefly for its pipes."""
        try:
            await within(asyncio.shield(output.exited), self._timeout)
        except TimeoutError:
            _kill_group(pgid)
            with contextlib.suppress(TimeoutError):
                await within(asyncio.shield(output.exited), KILL_GRACE)
            raise AuthError(
                f"account {self.account!r}: token_command took longer than "
                f"{self._timeout:g}s and was killed"
            ) from None
        with contextlib.suppress(TimeoutError):
            await within(asyncio.shield(output.pipes_closed), PIPE_GRACE)

    def _result(self, output: _CommandOutput, returncode: int | None) -> str:
        if returncode != 0:
            said = stderr_summary(output.data[2].decode("utf-8", "replace"), [self._token])
            raise AuthError(
                f"account {self.account!r}: token_command failed: "
                f"{_exit_description(returncode)}: {said}"
            )
        if output.overflow:
            raise AuthError(
                f"account {self.account!r}: token_command printed more than "
                f"{COMMAND_OUTPUT_LIMIT // 1024} KiB"
            )
        return output.data[1].decode("utf-8", "replace")

    def _explain(self, problem: TokenProblem) -> str:
        if problem is TokenProblem.CHARACTERS:
            return f"token_command's output {problem.value}"
        return f"token_command {problem.value}"


class FileTokenProvider(_CachingProvider):
    """Reads a token from a file that another tool keeps fresh; re-read when the file changes."""

    def __init__(self, account: str, path: Path) -> None:
        super().__init__(account)
        self._path = path
        self._seen: tuple[int, int] | None = None

    async def token(self, refused: str | None = None) -> str:
        try:
            stat = os.stat(self._path)
        except OSError as exc:
            raise AuthError(
                f"account {self.account!r}: token_file {str(self._path)!r}: {exc.strerror}"
            ) from None
        if (stat.st_mtime_ns, stat.st_size) != self._seen:
            self._seen = (stat.st_mtime_ns, stat.st_size)
            self._refresh_at = 0.0  # the file changed: take what it holds now
        return await super().token(refused)

    async def _fetch(self) -> str:
        try:
            return await asyncio.to_thread(self._path.read_text, encoding="utf-8")
        except OSError as exc:
            raise AuthError(
                f"account {self.account!r}: token_file {str(self._path)!r}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise AuthError(
                f"account {self.account!r}: token_file {str(self._path)!r} "
                f"{TokenProblem.CHARACTERS.value}"
            ) from None

    def _explain(self, problem: TokenProblem) -> str:
        wording = {
            TokenProblem.EMPTY: "is empty",
            TokenProblem.LINES: "holds more than one line",
            TokenProblem.CHARACTERS: TokenProblem.CHARACTERS.value,
        }
        return f"token_file {str(self._path)!r} {wording[problem]}"


# --------------------------------------------------------------------------- MSAL sign-in

ACCOUNTS_DIR = "accounts"
# Per request to the sign-in service. A refresh runs with the account's locks held, so a request
# that hung would stall every drive of the account.
MSAL_TIMEOUT = 30.0
# OAuth errors that a later retry can fix. Any other error answer to a refresh means a person has
# to act (sign in again, consent, fix the app registration), so the drive waits in NEEDS_LOGIN.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})

# (inode, mtime_ns, size) of a cache file. Every write replaces the file, so the inode changes
# even when a rewrite lands within the same mtime tick and has the same size.
_Stamp = tuple[int, int, int]


class HttpClient(Protocol):
    """What MSAL needs from an HTTP client; a requests.Session fits."""

    def get(self, url: str, **kwargs: Any) -> Any: ...

    def post(self, url: str, **kwargs: Any) -> Any: ...


# None: the client each account was given (relayd's sign-in session: its CA and proxy), else
# MSAL's own. Tests set this to a fake login service, which then wins over any given client, so
# that the daemon and the CLI commands sign in without a network.
default_http_client: HttpClient | None = None


def cache_path(state_dir: Path, account: str) -> Path:
    """Where `relayd login` keeps an account's MSAL token cache."""
    return state_dir / ACCOUNTS_DIR / f"{account}.msal.json"


class TokenCacheFile:
    """One account's token cache on disk: mode 0600, replaced atomically, locked while changed.

    The lock is an flock on a sibling ``.lock`` file (never deleted, so every process locks the
    same inode), held around each read-modify-write: a daemon rolling the refresh token and a
    `relayd login` storing a new sign-in never overwrite each other. flock also excludes two
    open file descriptions within one process, so threads are covered too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def stamp(self) -> _Stamp | None:
        """Identity of the current content, None when there is no file. Raises OSError."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self._make_dir()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write(self, text: str) -> None:
        """Replace the content: a reader sees the old file or the new one, never half of one."""
        self._make_dir()
        # mkstemp creates the file with mode 0600 (never more, whatever the umask): refresh
        # tokens are credentials, and the file is never readable by others, not for a moment.
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._sync_dir()

    def remove(self) -> bool:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        self._sync_dir()
        return True

    def _make_dir(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _sync_dir(self) -> None:
        # The rename (or unlink) itself survives a power cut only once the folder is synced.
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class AccessToken:
    """An access token as MSAL gave it; the repr leaves the token out."""

    token: str = field(repr=False)
    expires_at: float  # Unix seconds
    username: str | None


class MsalAccount:
    """A client_id account: its MSAL application and the token cache file it persists to.

    Blocking (file locks, HTTP): the daemon calls it through asyncio.to_thread. Thread-safe.
    """

    def __init__(
        self,
        name: str,
        config: AccountConfig,
        state_dir: Path,
        *,
        http_client: HttpClient | None = None,
    ) -> None:
        if config.client_id is None:
            raise ValueError(f"account {name!r} has no client_id")
        self.name = name
        self.client_id = config.client_id
        self.scopes = list(config.scopes)
        self.authority = f"{config.authority_host}/{config.tenant}"
        self.file = TokenCacheFile(cache_path(state_dir, name))
        self._http_client = http_client
        self._cache = msal.SerializableTokenCache()
        self._loaded: _Stamp | None = None  # the file's stamp when self._cache was read/written
        self._app: Any = None  # built on first use: building it asks the service for endpoints
        self._lock = threading.Lock()

    # ---- used by the daemon --------------------------------------------------------------------

    def changed(self) -> bool:
        """Whether another process wrote or removed the file since this one last touched it."""
        try:
            return self.file.stamp() != self._loaded
        except OSError:
            return True

    def acquire(self, *, force_refresh: bool = False, refused: str | None = None) -> AccessToken:
        """A token from the cache, or refreshed with the cached refresh token; raises AuthError.

        `refused` is a token Graph answered 401 to: never returned, even if MSAL still holds it.
        """
        with self._lock, self._file_errors():
            if self._app is None:
                if self.file.stamp() is None:
                    raise self._not_signed_in()  # no sign-in yet: no need to reach the service
                self._app = self._application(self._cache)
            with self.file.locked():
                self._reload()
                accounts = self._app.get_accounts()
                if not accounts:
                    raise self._not_signed_in()
                try:
                    result = self._silent(accounts[0], force_refresh)
                    if not force_refresh and refused is not None and _token_of(result) == refused:
                        # MSAL's cache still holds what Graph refused (e.g. after a restart).
                        result = self._silent(accounts[0], True)
                except Exception as exc:
                    raise self._unreachable(exc) from exc
                finally:
                    # A refresh rolls the refresh token: the new one must reach the file even if
                    # something failed afterwards, since the old one may no longer be accepted.
                    if self._cache.has_state_changed:
                        self._save()
        return self._access_token(result, accounts[0])

    # ---- used by the CLI -----------------------------------------------------------------------

    def login(self, show: Callable[[str], None]) -> str:
        """Device-code sign-in; `show` gets the instructions for the person at the terminal.

        Blocks until the person has signed in or the code expired (15 minutes). The file is only
        locked to store the result, not while waiting. Returns the signed-in username.
        """
        cache = msal.SerializableTokenCache()  # the new sign-in replaces the old one whole
        app = self._application(cache)
        try:
            flow = app.initiate_device_flow(scopes=self.scopes)
        except Exception as exc:
            raise self._unreachable(exc) from exc
        if "user_code" not in flow:
            raise AuthError(
                f"account {self.name!r}: the sign-in service did not start a device-code "
                f"sign-in: {_oauth_problem(flow, describe=True)}"
            )
        show(str(flow["message"]))
        try:
            result = app.acquire_token_by_device_flow(flow)
        except Exception as exc:
            raise self._unreachable(exc) from exc
        if "access_token" not in result:
            raise AuthError(
                f"account {self.name!r}: sign-in failed: {_oauth_problem(result, describe=True)}"
            )
        with self._lock, self._file_errors(), self.file.locked():
            self.file.write(cache.serialize())
        claims = result.get("id_token_claims") or {}
        return str(claims.get("preferred_username") or claims.get("upn") or "(no username)")

    def logout(self) -> bool:
        """Forget the sign-in; False when there was none."""
        with self._lock, self._file_errors(), self.file.locked():
            removed = self.file.remove()
            self._cache.deserialize(None)
            self._loaded = None
        return removed

    def cached_username(self) -> str | None:
        """Who the cache file says is signed in; reads the file only, no network."""
        cache = msal.SerializableTokenCache()
        try:
            cache.deserialize(self.file.read())
        except (OSError, ValueError):
            return None
        for account in cache.search(msal.TokenCache.CredentialType.ACCOUNT):
            if account.get("username"):
                return str(account["username"])
        return None

    # ---- internals -----------------------------------------------------------------------------

    def _application(self, cache: Any) -> Any:
        client = default_http_client if default_http_client is not None else self._http_client
        try:
            return msal.PublicClientApplication(
                self.client_id,
                authority=self.authority,
                token_cache=cache,
                http_client=client,
                timeout=MSAL_TIMEOUT,  # only used by MSAL's own session (client None)
                # The authority is configured explicitly and the cache only ever holds tokens
                # from it, so instance discovery (a request to login.microsoftonline.com, which
                # a national-cloud network may not reach) would add nothing.
                instance_discovery=False,
            )
        except Exception as exc:
            raise self._unreachable(exc) from exc

    def _silent(self, account: Mapping[str, Any], force_refresh: bool) -> Any:
        return self._app.acquire_token_silent_with_error(
            self.scopes, account, force_refresh=force_refresh
        )

    def _reload(self) -> None:
        """Read the file into the cache if another process changed it (a new `relayd login`)."""
        stamp = self.file.stamp()
        if stamp == self._loaded:
            return
        self._loaded = stamp
        try:
            self._cache.deserialize(self.file.read())
        except ValueError:
            self._cache.deserialize(None)
            raise AuthError(
                f"account {self.name!r}: the token cache {self.file.path} is unreadable; "
                f"run `relayd login {self.name}`",
                needs_login=True,
            ) from None

    def _save(self) -> None:
        self.file.write(self._cache.serialize())
        self._loaded = self.file.stamp()

    def _access_token(self, result: Any, account: Mapping[str, Any]) -> AccessToken:
        if result is None:  # the account is cached, its refresh token is not
            raise AuthError(
                f"account {self.name!r} needs `relayd login {self.name}` again: "
                "no refresh token in the token cache",
                needs_login=True,
            )
        if "error" in result:
            problem = _oauth_problem(result)
            if str(result["error"]) in _TRANSIENT_ERRORS:
                raise AuthError(f"account {self.name!r}: token refresh failed for now: {problem}")
            raise AuthError(
                f"account {self.name!r} needs `relayd login {self.name}` again: {problem}",
                needs_login=True,
            )
        token = _token_of(result)
        if token is None:
            raise AuthError(f"account {self.name!r}: the sign-in service gave no access token")
        expires_in = result.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 0.0
        return AccessToken(token, time.time() + lifetime, account.get("username") or None)

    def _not_signed_in(self) -> AuthError:
        return AuthError(
            f"account {self.name!r} is not signed in: run `relayd login {self.name}`",
            needs_login=True,
        )

    def _unreachable(self, exc: BaseException) -> AuthError:
        # MSAL raises whatever its HTTP client raises (requests' exceptions by default), and
        # ValueError when discovery fails (e.g. an unknown tenant). Signing in again fixes none
        # of these, so they are not needs_login: the drive retries with its usual backoff.
        return AuthError(
            f"account {self.name!r}: cannot use the sign-in service at {self.authority}: "
            f"{_describe(exc)}"
        )

    @contextlib.contextmanager
    def _file_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise AuthError(
                f"account {self.name!r}: token cache {self.file.path}: {exc.strerror or exc}"
            ) from None


def _token_of(result: Any) -> str | None:
    token = result.get("access_token") if isinstance(result, dict) else None
    return token if isinstance(token, str) and token else None


def _oauth_problem(result: Mapping[str, Any], *, describe: bool = False) -> str:
    """An OAuth error answer as `invalid_grant (AADSTS700082)`: the codes say what happened."""
    text = str(result.get("error") or "unknown_error")
    extra = [f"AADSTS{code}" for code in result.get("error_codes") or ()]
    if result.get("suberror"):
        extra.append(str(result["suberror"]))
    if extra:
        text += f" ({', '.join(extra)})"
    if text.startswith("invalid_client"):
        text += "; is 'Allow public client flows' enabled in the app registration?"
    description = str(result.get("error_description") or "").strip()
    if describe and description:
        # Entra ID appends trace and correlation ids on further lines: the first line says it.
        text += f": {description.splitlines()[0][:300]}"
    return text


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


class MsalTokenProvider:
    """Tokens for a client_id account from the cache `relayd login` stored, refreshed silently.

    One per account, shared by its drives; the asyncio.Lock makes concurrent callers wait for a
    single refresh. MSAL's calls run in a thread so the event loop never blocks on them.
    """

    def __init__(
        self,
        name: str,
        config: AccountConfig,
        state_dir: Path,
        *,
        http_client: HttpClient | None = None,
    ) -> None:
        self.account = name
        self.msal = MsalAccount(name, config, state_dir, http_client=http_client)
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._reported: str | None = None  # the needs-login problem already logged
        self.refreshes = 0  # tokens taken from MSAL (the relayd_token_refreshes metric)

    async def token(self, refused: str | None = None) -> str:
        async with self._lock:
            # A stat of a local file: cheap enough for the event loop, and it is how a new
            # `relayd login` (or a logout) takes effect at once rather than at the next refresh.
            if self.msal.changed():
                self._token = None
            current = self._token
            if current is not None and current != refused and time.time() < self._refresh_at:
                return current
            force = refused is not None and refused == current
            try:
                got = await asyncio.to_thread(
                    self.msal.acquire, force_refresh=force, refused=refused
                )
            except AuthError as exc:
                self._token = None
                if exc.needs_login and str(exc) != self._reported:
                    # Once per problem: the drives retry every minute, the log need not.
                    self._reported = str(exc)
                    log.error("account needs sign-in", account=self.account, problem=str(exc))
                raise
            if self._reported is not None:
                self._reported = None
                log.info("account signed in again", account=self.account, user=got.username)
            self._token = got.token
            self.refreshes += 1
            # MSAL itself refreshes tokens with less than EXPIRY_MARGIN left; ask it again then.
            self._refresh_at = got.expires_at - EXPIRY_MARGIN
            return got.token


def login(
    name: str,
    account: AccountConfig,
    state_dir: Path,
    *,
    show: Callable[[str], None],
    http_client: HttpClient | None = None,
) -> str:
    """`relayd login`: device-code sign-in stored for the daemon; returns the username."""
    return MsalAccount(name, account, state_dir, http_client=http_client).login(show)


def logout(name: str, account: AccountConfig, state_dir: Path) -> bool:
    """`relayd logout`: forget the stored sign-in; False when there was none.

    The refresh token stays valid at Entra ID until it expires or the user's sessions are
    revoked there; it is only removed from this machine.
    """
    return MsalAccount(name, account, state_dir).logout()


def sign_in_account(accounts: Mapping[str, AccountConfig], name: str) -> AccountConfig:
    """The configured client_id account `name`, or an AuthError saying why there is none."""
    account = accounts.get(name)
    if account is None:
        known = ", ".join(sorted(accounts)) or "none"
        raise AuthError(f"no account {name!r} in the config (accounts: {known})")
    if account.kind != "msal":
        source = "token_command" if account.kind == "command" else "token_file"
        raise AuthError(f"account {name!r} gets its tokens from {source}: it has no sign-in")
    return account


@dataclass(frozen=True)
class AccountReport:
    """One line of `relayd accounts`."""

    name: str
    kind: str  # "msal", "command" or "file"
    user: str | None
    scopes: tuple[str, ...]
    expires_at: float | None  # of the token just obtained
    problem: str | None  # why no token can be obtained now; None when one was
    needs_login: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None


async def check_account(
    name: str, account: AccountConfig, state_dir: Path, *, http_client: HttpClient | None = None
) -> AccountReport:
    """Get a token now, the way the daemon would; for a client_id account, by a forced refresh,
    so the answer says whether the refresh token still works, not just what the cache holds."""
    if account.kind == "msal":
        core = MsalAccount(name, account, state_dir, http_client=http_client)
        try:
            got = await asyncio.to_thread(core.acquire, force_refresh=True)
        except AuthError as exc:
            user = await asyncio.to_thread(core.cached_username)
            return AccountReport(
                name, "msal", user, account.scopes, None, str(exc), exc.needs_login
            )
        return AccountReport(name, "msal", got.username, account.scopes, got.expires_at, None)
    provider: _CachingProvider
    if account.token_command is not None:
        provider = CommandTokenProvider.from_config(name, account)
    else:
        assert account.token_file is not None  # config guarantees one source
        provider = FileTokenProvider(name, account.token_file)
    try:
        token = (await provider.token()).strip()
    except AuthError as exc:
        return AccountReport(name, account.kind, None, (), None, str(exc), exc.needs_login)
    claims = jwt_claims(token) or {}
    user = claims.get("upn") or claims.get("preferred_username") or claims.get("unique_name")
    scopes = tuple(str(claims.get("scp") or "").split())
    return AccountReport(
        name, account.kind, str(user) if user else None, scopes, jwt_expiry(token), None
    )
