"""Tell systemd how the service is doing: the sd_notify protocol, in pure Python.

Under ``Type=notify`` systemd passes the path of a datagram socket in ``NOTIFY_SOCKET`` and
waits for ``READY=1`` before it calls the service started; ``WatchdogSec=`` makes it expect
``WATCHDOG=1`` at least that often, and ``RELOADING=1``/``STOPPING=1`` show up in
``systemctl status``. Each message is one datagram of ``KEY=value`` lines.

Without systemd (a terminal, a container, the tests) ``NOTIFY_SOCKET`` is absent and every
method is a no-op, so callers never need to ask whether they run under systemd.

libsystemd is not used on purpose: it would be a native dependency for a dozen lines, and
containers and non-systemd hosts would have to carry it all the same.

Notifying is advisory: a failure to send must never take the relay down. Errors are logged
once per notifier (a full or vanished socket would otherwise log on every watchdog tick) and
never raised.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

__all__ = ["Notifier", "watchdog_interval"]

log = structlog.get_logger("relayd.systemd")


class Notifier:
    """Sends sd_notify datagrams to ``address``, or does nothing when it is ``None``."""

    def __init__(self, address: bytes | None) -> None:
        # bytes, not str: an abstract address starts with a NUL byte and a path socket may have
        # any bytes in its name; socket.sendto takes both as they are.
        self.address = address
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for in ``NOTIFY_SOCKET``; disabled when there is none.

        ``/path`` is a socket in the file system, ``@name`` one in Linux's abstract namespace
        (systemd writes the leading NUL byte as ``@``). Any other form (systemd 254's
        ``vsock:`` addresses, for one) is not spoken here and disables the notifier, with a
        warning, rather than failing the start.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        if value.startswith("/"):
            return cls(os.fsencode(value))
        if value.startswith("@") and len(value) > 1:
            return cls(b"\0" + os.fsencode(value[1:]))
        log.warning("NOTIFY_SOCKET is not a unix socket address; not notifying", value=value)
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """Send ``fields`` (each ``KEY=value`` on one line) together in one datagram.

        One datagram, because systemd reads each one as a unit: RELOADING=1 must arrive with
        its MONOTONIC_USEC, READY=1 with the STATUS it announces. A malformed field is the
        caller's bug and raises ValueError, with or without systemd, so tests catch it;
        failing to send is logged once and otherwise ignored.
        """
        for field in fields:
            key, equals, _ = field.partition("=")
            if not equals or not key or "\n" in field:
                raise ValueError(f"not a KEY=value line: {field!r}")
        if self.address is None or not fields:
            return
        payload = "\n".join(fields).encode("utf-8", "surrogateescape")
        try:
            if self._socket is None:
                # Non-blocking: if systemd is not reading, drop the message rather than stall
                # the event loop; systemd's own sd_notify does not wait either.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(payload, self.address)
        except OSError as exc:
            self._report(exc)

    def _report(self, exc: OSError) -> None:
        if self._failed:
            return
        self._failed = True
        log.warning(
            "cannot notify systemd; further failures are not logged",
            socket=os.fsdecode(self.address or b"").replace("\0", "@", 1),
            error=exc.strerror or str(exc),
        )

    def ready(self, status: str | None = None) -> None:
        """Started (or done reloading): ``READY=1``, with a status line if given."""
        if status is None:
            self.send("READY=1")
        else:
            self.send("READY=1", _status_field(status))

    def reloading(self) -> None:
        """Reloading the configuration; ``ready()`` must follow when done.

        sd_notify(3) asks for RELOADING=1 together with MONOTONIC_USEC, the time the reload
        began on CLOCK_MONOTONIC in microseconds: systemd 253+ uses it to tell this reload
        from an earlier one (Type=notify-reload).
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutting down: ``STOPPING=1``."""
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """A free-form status line for ``systemctl status``."""
        self.send(_status_field(text))

    def watchdog(self) -> None:
        """Still alive: ``WATCHDOG=1``; send every :func:`watchdog_interval` seconds."""
        self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __repr__(self) -> str:
        where = "disabled" if self.address is None else repr(self.address)
        return f"Notifier({where})"


def _status_field(text: str) -> str:
    # STATUS is one line in the protocol; a newline would start a bogus field.
    return "STATUS=" + " ".join(text.split())


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, pid: int | None = None
) -> float | None:
    """How often to send ``WATCHDOG=1``, in seconds; ``None`` when no watchdog is expected.

    systemd sets ``WATCHDOG_USEC`` (the timeout) when ``WatchdogSec=`` is on, and
    ``WATCHDOG_PID`` to the process it expects to hear from. A WATCHDOG_PID that is not
    ``pid`` (default: this process) means the variables were inherited by a child, which must
    not ping on the service's behalf. Pinging at half the timeout, as sd_watchdog_enabled's
    documentation advises, leaves room for one late tick.
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    pid_text = environ.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        expected_pid = int(pid_text) if pid_text else None
    except ValueError:
        return None
    if usec <= 0:
        return None
    if expected_pid is not None and expected_pid != (os.getpid() if pid is None else pid):
        return None
    return usec / 2 / 1_000_000
