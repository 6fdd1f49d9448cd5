"""Bearer tokens for Graph, one provider per configured account.

Every drive of an account shares its provider, so a 401 seen by many drives at once refreshes the
token once: callers pass the token that was refused, and a provider that already holds a newer one
just hands it out.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

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


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (Unix seconds) of a JWT, or None when the token is not a readable JWT.

    Only read, never verified: it decides when to fetch a new token, nothing more.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except ValueError:
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


class _CachingProvider(ABC):
    """Keeps one token until it is refused or near its expiry; `_fetch` gets a new one."""

    def __init__(self, account: str) -> None:
        self.account = account
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    async def token(self, refused: str | None = None) -> str:
        async with self._lock:
            current = self._token
            fresh = current is not None and time.time() < self._refresh_at
            if current is not None and fresh and current != refused:
                return current
            token = (await self._fetch()).strip()
            if not token:
                raise AuthError(f"account {self.account!r}: the token source gave an empty token")
            expiry = jwt_expiry(token)
            lifetime = OPAQUE_TOKEN_LIFETIME if expiry is None else expiry - time.time()
            self._token = token
            self._refresh_at = time.time() + max(0.0, lifetime - EXPIRY_MARGIN)
            return token

    @abstractmethod
    async def _fetch(self) -> str:
        """Get a new token from the source."""


class CommandTokenProvider(_CachingProvider):
    """Runs `token_command` (split like a shell would, run without one); stdout is the token."""

    def __init__(self, account: str, command: str, *, timeout: float = 60.0) -> None:
        super().__init__(account)
        self._argv = shlex.split(command)
        self._timeout = timeout

    async def _fetch(self) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise AuthError(
                f"account {self.account!r}: token_command {self._argv[0]!r} cannot run: "
                f"{exc.strerror}"
            ) from None
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AuthError(
                f"account {self.account!r}: token_command took longer than {self._timeout:g}s"
            ) from None
        if process.returncode != 0:
            # The last line of stderr is usually the tool's own explanation ("please run az login").
            lines = stderr.decode("utf-8", "replace").strip().splitlines()
            said = lines[-1][:200] if lines else "nothing on stderr"
            raise AuthError(
                f"account {self.account!r}: token_command exited {process.returncode}: {said}"
            )
        return stdout.decode("utf-8", "replace")


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
