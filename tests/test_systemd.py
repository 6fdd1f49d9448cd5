"""relayd.systemd: sd_notify datagrams as systemd receives them, on real AF_UNIX sockets.

The last test runs `relayd run` as systemd would (NOTIFY_SOCKET, WATCHDOG_USEC) and checks the
whole conversation: READY=1, watchdog pings, RELOADING=1 on SIGHUP, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from relayd.systemd import Notifier, watchdog_interval

# sun_path holds 108 bytes with its NUL; stay clear of it.
MAX_SOCKET_PATH = 100


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Listener:
    """The systemd side: a bound datagram socket and reads with deadlines."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.seen: list[bytes] = []

    def receive(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no datagram within {timeout:g}s; seen: {self.seen}") from None
        self.seen.append(data)
        return data

    def expect(
        self, wanted: Callable[[list[str]], bool], *, timeout: float, what: str
    ) -> list[str]:
        """Read datagrams until one satisfies `wanted` (given its fields); fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            try:
                fields = self.receive(remaining).decode().split("\n")
            except AssertionError:
                raise AssertionError(
                    f"timed out after {timeout:g}s waiting for {what}; seen: {self.seen}"
                ) from None
            if wanted(fields):
                return fields

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            extra = self.sock.recv(4096)
        except BlockingIOError:
            return
        raise AssertionError(f"unexpected datagram {extra!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    """A path for a socket in tmp_path, or in a short temporary folder if tmp_path is too long."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="relayd-") as short:
        yield Path(short) / "notify.sock"


@pytest.fixture
def listener(socket_path: Path) -> Iterator[Listener]:
    receiver = Listener(str(socket_path))
    yield receiver
    receiver.close()


# -- the notifier ---------------------------------------------------------------------------------


def test_path_socket_receives_exactly_the_expected_datagrams(
    socket_path: Path, listener: Listener
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(socket_path)})
    assert notifier.enabled
    assert notifier.address == os.fsencode(socket_path)

    notifier.ready()
    assert listener.receive() == b"READY=1"
    notifier.ready("watching 2 drives")
    assert listener.receive() == b"READY=1\nSTATUS=watching 2 drives"
    notifier.status("delivering\nto 3   webhooks ")
    assert listener.receive() == b"STATUS=delivering to 3 webhooks"
    notifier.watchdog()
    assert listener.receive() == b"WATCHDOG=1"
    notifier.stopping()
    assert listener.receive() == b"STOPPING=1"

    before = monotonic_usec()
    notifier.reloading()
    after = monotonic_usec()
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", listener.receive())
    assert match is not None, listener.seen[-1]
    assert before <= int(match[1]) <= after  # CLOCK_MONOTONIC in microseconds

    notifier.send("A=1", "B=2")
    assert listener.receive() == b"A=1\nB=2"
    notifier.send()  # nothing to say: no datagram
    listener.assert_empty()
    notifier.close()
    notifier.watchdog()  # a closed notifier opens a new socket
    assert listener.receive() == b"WATCHDOG=1"
    notifier.close()


def test_abstract_socket_receives_the_datagrams() -> None:
    name = f"relayd-test-{uuid.uuid4().hex}"
    listener = Listener(b"\0" + name.encode())
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.address == b"\0" + name.encode()
        notifier.ready("up")
        assert listener.receive() == b"READY=1\nSTATUS=up"
        notifier.stopping()
        assert listener.receive() == b"STOPPING=1"
        notifier.close()
    finally:
        listener.close()


def test_from_environment_reads_os_environ_by_default(
    socket_path: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(socket_path))
    notifier = Notifier.from_environment()
    notifier.watchdog()
    assert listener.receive() == b"WATCHDOG=1"
    notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"}])
def test_without_systemd_the_notifier_is_silent(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_socket(*args: object) -> socket.socket:
        raise AssertionError("a disabled notifier opened a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    notifier = Notifier.from_environment(environ)
    assert not notifier.enabled
    with capture_logs() as logged:
        notifier.ready("up")
        notifier.reloading()
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        notifier.send("A=1")
        notifier.close()
    assert logged == []


def test_an_address_that_is_not_a_unix_socket_disables_with_a_warning() -> None:
    with capture_logs() as logged:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert [entry["log_level"] for entry in logged] == ["warning"]


def test_send_failures_are_logged_once_and_never_raised(tmp_path: Path) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    with capture_logs() as logged:
        notifier.ready()
        notifier.watchdog()
        notifier.reloading()
        notifier.stopping()
    assert len(logged) == 1
    assert logged[0]["log_level"] == "warning"
    assert "gone.sock" in logged[0]["socket"]
    notifier.close()


def test_a_full_socket_never_blocks_the_sender(socket_path: Path, listener: Listener) -> None:
    # Nobody reads: after the kernel's datagram queue fills, a blocking send would hang here.
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(socket_path)})
    started = time.monotonic()
    with capture_logs() as logged:
        for _ in range(2000):
            notifier.watchdog()
    assert time.monotonic() - started < 5
    assert len(logged) == 1  # the first EAGAIN, then silence
    assert listener.receive() == b"WATCHDOG=1"  # what fitted in the queue did arrive
    notifier.close()


@pytest.mark.parametrize("field", ["READY", "=1", "A=1\nB=2", "STATUS=two\nlines"])
def test_malformed_fields_are_the_callers_bug(field: str) -> None:
    for notifier in (Notifier(None), Notifier(b"\0relayd-unused")):
        with pytest.raises(ValueError, match="KEY=value"):
            notifier.send("READY=1", field)
        notifier.close()


# -- watchdog_interval ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "pid", "expected"),
    [
        ({}, None, None),
        ({"WATCHDOG_USEC": "30000000"}, None, 15.0),
        ({"WATCHDOG_USEC": "400000"}, None, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "42"}, 42, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "42"}, 43, None),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""}, 43, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "x"}, 42, None),
        ({"WATCHDOG_USEC": ""}, None, None),
        ({"WATCHDOG_USEC": "0"}, None, None),
        ({"WATCHDOG_USEC": "-1000000"}, None, None),
        ({"WATCHDOG_USEC": "1.5"}, None, None),
        ({"WATCHDOG_USEC": "soon"}, None, None),
    ],
)
def test_watchdog_interval(
    environ: dict[str, str], pid: int | None, expected: float | None
) -> None:
    assert watchdog_interval(environ, pid) == expected


def test_watchdog_interval_checks_this_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 1.0
    assert watchdog_interval({**mine, "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    monkeypatch.setenv("WATCHDOG_USEC", "6000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 3.0


# -- the daemon under a pretend systemd -----------------------------------------------------------


def test_daemon_sends_ready_watchdog_reloading_stopping(
    tmp_path: Path, socket_path: Path, listener: Listener
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "admin": {"listen": ""},
                "log": {"level": "debug", "format": "json"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in {"WATCHDOG_PID", "RELAYD_CONFIG"}}
    env |= {"NOTIFY_SOCKET": str(socket_path), "WATCHDOG_USEC": "400000"}
    log = tmp_path / "relayd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "relayd", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=env,
        )

    def failed(step: str) -> str:
        state = "running" if process.poll() is None else f"exited with {process.returncode}"
        return f"{step} (relayd {state}); its log:\n{log.read_text()[-4000:]}"

    try:
        try:
            listener.expect(lambda f: "READY=1" in f, timeout=15, what="READY=1")
        except AssertionError as exc:
            raise AssertionError(failed(str(exc))) from None

        # WATCHDOG_USEC=400000: a ping every 0.2 s, so two within 2 s with room to spare.
        pings = 0
        deadline = time.monotonic() + 2.0
        while pings < 2:
            try:
                fields = listener.expect(
                    lambda f: "WATCHDOG=1" in f,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    what="two WATCHDOG=1 within 2 s",
                )
            except AssertionError as exc:
                raise AssertionError(failed(f"{exc} (got {pings})")) from None
            pings += fields.count("WATCHDOG=1")

        before = monotonic_usec()
        process.send_signal(signal.SIGHUP)
        try:
            fields = listener.expect(
                lambda f: "RELOADING=1" in f, timeout=10, what="RELOADING=1 after SIGHUP"
            )
            usec = [f for f in fields if f.startswith("MONOTONIC_USEC=")]
            assert usec, f"RELOADING=1 without MONOTONIC_USEC in the same datagram: {fields}"
            assert before <= int(usec[0].partition("=")[2]) <= monotonic_usec()
            listener.expect(lambda f: "READY=1" in f, timeout=10, what="READY=1 after reload")
        except AssertionError as exc:
            raise AssertionError(failed(str(exc))) from None
        assert process.poll() is None, failed("SIGHUP ended relayd")

        process.send_signal(signal.SIGTERM)
        try:
            listener.expect(lambda f: "STOPPING=1" in f, timeout=10, what="STOPPING=1")
        except AssertionError as exc:
            raise AssertionError(failed(str(exc))) from None
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(failed("still running 15 s after SIGTERM")) from None
        assert code == 0, failed(f"exit code {code}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
