"""A real outbound HTTP proxy for tests: Debian's tinyproxy as a child process.

`Tinyproxy(folder)` writes its own config (listen on 127.0.0.1 at a free port, CONNECT allowed to
any port, every connection and request logged to a file), starts `tinyproxy -d`, and waits for
its port with a deadline. `requests()` reads back what it was asked: `("CONNECT",
"127.0.0.1:PORT")` for a tunnel (https, wss), `("GET", "http://...")` for plain HTTP.
Started by root, it runs as nobody. scripts/test installs it (apt-get install tinyproxy-bin).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from types import TracebackType

from support.daemon import free_port

__all__ = ["Tinyproxy"]

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


class Tinyproxy:
    """tinyproxy on 127.0.0.1; `credentials=("user", "password")` makes it demand Basic auth."""

    def __init__(self, folder: Path, *, credentials: tuple[str, str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.log = folder / "tinyproxy.out"  # its stdout and stderr: the connection log
        self.credentials = credentials
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The proxy's URL, with its credentials when it has some."""
        userinfo = ":".join(self.credentials) + "@" if self.credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 600",  # an idle tunnel (a quiet WebSocket between pings) stays open
            # No LogFile: in the foreground (-d) tinyproxy logs to its stdout, which is our file,
            # already open when it drops root (a LogFile would be opened as nobody, and pytest's
            # folders are root's alone).
            "LogLevel Connect",  # one line per connection and per request
            "MaxClients 2000",
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
            # No ConnectPort line: CONNECT is allowed to every port (the emulator's are random).
        ]
        if os.geteuid() == 0:  # it runs as root with a warning; it need not
            lines += ["User nobody", "Group nogroup"]
        if self.credentials:
            lines.append("BasicAuth {} {}".format(*self.credentials))
        return "\n".join(lines) + "\n"

    async def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        config = self.folder / "tinyproxy.conf"
        config.write_text(self._config())
        output = self.log.open("ab")
        with output:
            self._process = await asyncio.create_subprocess_exec(
                binary,
                "-d",
                "-c",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.returncode is not None:
                raise RuntimeError(
                    f"tinyproxy exited with {self._process.returncode}: {self.log.read_text()}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tinyproxy did not listen within {timeout:g}s") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the proxy received so far."""
        if not self.log.exists():
            return []
        return _REQUEST.findall(self.log.read_text(errors="replace"))

    def tunnels(self) -> list[str]:
        """The `host:port` of every CONNECT so far."""
        return [target for method, target in self.requests() if method == "CONNECT"]

    async def __aenter__(self) -> Tinyproxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
