"""token_command and token_file faults (issue 10): hanging wrappers, secrets on stderr, bad output.

The fault tests run the real daemon (`relayd run` in a subprocess, as in tests/test_cli.py) against
the Graph emulator on loopback, with a real token_command script in the test's folder, and look
where a user would: `/status`, `relayd status`, the daemon's log, and the process table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import relay_config
from support.configs import TOKEN, relay_document
from support.daemon import free_port, write_daemon_config
from support.token_endpoint import make_jwt
from support.waiting import wait_until
from test_cli import RelayProcess, run_cli

from relayd.auth import (
    STDERR_SHOWN,
    AuthError,
    CommandTokenProvider,
    FileTokenProvider,
    TokenProblem,
    stderr_summary,
    token_problem,
)
from relayd.config import ConfigError, parse_config
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.logs import REDACTED

# What a failing token helper might print on stderr: an access token (JWT) and an opaque refresh
# token, the two shapes a log redaction that looks for JWTs alone lets through one of.
JWT = make_jwt({"upn": "ada@contoso.example", "exp": int(time.time()) + 3600, "scp": "Files.Read"})
OPAQUE = (
    "0.AXYAmJsOwRUlyUqaN3B1p1cTbkq8d9KZqlBMhJ2aJrvd3M_8AAA.AgABAAEAAAD--DLA3VO7QrddgJg7WevrAgDs"
)
SECRETS = (JWT, OPAQUE, TOKEN)


# ---- helpers ----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether `pid` is a live process; a zombie (dead, not yet reaped by its parent) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # The process can be reaped between the kill() above and the read: the file was opened
        # but its read answers ESRCH.
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


@pytest.fixture
def reap(tmp_path: Path) -> Iterator[list[int]]:
    """Pids a test saw; whatever is still alive at the end is killed, so a test that fails (on
    code that leaks its children) leaves no sleeper behind on the machine."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def hanging_command(tmp_path: Path) -> Path:
    """A wrapper like Azure CLI's `az`: runs the real program without exec. Writes its own pid
    and its child's, then waits for the child (which keeps stdout and stderr open)."""
    return script(
        tmp_path,
        "hanging-token",
        f"echo $$ > {tmp_path}/shell.pid\n"
        "sleep 600 &\n"
        f"echo $! > {tmp_path}/child.pid\n"
        "wait $!\n"
        f"echo {TOKEN}\n",
    )


def daemon_config(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    account: dict[str, Any],
) -> tuple[Path, int]:
    """A config file for `relayd run`: one drive on `account`, admin on a free loopback port."""
    port = free_port()
    path = write_daemon_config(
        tmp_path / "config.yaml",
        emulator,
        receiver,
        state_dir=tmp_path / "state",
        admin_port=port,
        accounts={"test": account},
    )
    return path, port


async def command_running(tmp_path: Path, reap: list[int]) -> tuple[int, int]:
    """Wait until the hanging command runs; its shell's and its child's pids (to be reaped)."""
    await wait_until(
        lambda: read_pid(tmp_path / "shell.pid") and read_pid(tmp_path / "child.pid"),
        timeout=30,
        what="command running",
    )
    shell, child = read_pid(tmp_path / "shell.pid"), read_pid(tmp_path / "child.pid")
    assert shell is not None and child is not None
    reap.extend([shell, child])
    return shell, child


StartDaemon = Callable[[Path], Awaitable[RelayProcess]]


@pytest.fixture
async def start_daemon() -> AsyncIterator[StartDaemon]:
    """`relay = await start_daemon(config)`: a started `relayd run`, killed at the end."""
    started: list[RelayProcess] = []

    async def start(config: Path) -> RelayProcess:
        relay = RelayProcess(config)
        started.append(relay)
        await relay.start()
        return relay

    yield start
    for relay in started:
        await relay.stop()


async def status_of(http: aiohttp.ClientSession, port: int) -> tuple[str, dict[str, Any]] | None:
    """/status as text and as JSON; None while the daemon is not listening yet."""
    try:
        async with http.get(f"http://127.0.0.1:{port}/status") as response:
            text = await response.text()
    except aiohttp.ClientConnectionError:
        return None
    return text, json.loads(text)


async def wait_for_error(
    http: aiohttp.ClientSession, port: int, needle: str, *, timeout: float
) -> tuple[str, dict[str, Any]]:
    """Poll /status until drive d1's last_error contains `needle`; return /status then."""
    deadline = time.monotonic() + timeout
    while True:
        got = await status_of(http, port)
        if got is not None and needle in (got[1]["drives"]["d1"]["last_error"] or ""):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {needle!r}: {got}")
        await asyncio.sleep(0.05)


def assert_no_secret(text: str, where: str, secrets: tuple[str, ...] = SECRETS) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret reached {where}"


# ---- on a real daemon -------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_hanging_wrapper_is_killed_with_its_child_and_the_timeout_shows_in_status(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    http: aiohttp.ClientSession,
    start_daemon: StartDaemon,
    reap: list[int],
) -> None:
    command = hanging_command(tmp_path)
    config, port = daemon_config(
        tmp_path,
        emulator,
        receiver,
        {"token_command": str(command), "token_command_timeout": "2s"},
    )
    relay = await start_daemon(config)
    shell, child = await command_running(tmp_path, reap)
    started = time.monotonic()

    _, report = await wait_for_error(http, port, "took longer than 2s", timeout=20)
    noticed = time.monotonic() - started
    drive = report["drives"]["d1"]
    assert drive["state"] == "reconnecting"
    assert "account 'test': token_command took longer than 2s and was killed" in drive["last_error"]
    assert noticed < 2 + 8, f"the timeout was reported {noticed:.1f}s after the command started"
    # The whole group went, the sleeping grandchild included (it held the pipes open).
    await wait_until(lambda: not alive(shell) and not alive(child), timeout=10, what="group gone")

    relay.signal(signal.SIGTERM)
    assert await relay.wait(timeout=30) == 0
    # The retries ran the command again; none of its runs outlived the daemon.
    last = read_pid(tmp_path / "child.pid")
    assert last is not None
    reap.append(last)
    await wait_until(lambda: not alive(last), timeout=10, what="last run's child gone")
    log = relay.log.read_text()
    assert "took longer than 2s and was killed" in log
    assert "Traceback" not in log


@pytest.mark.timeout(90)
async def test_shutdown_while_the_command_runs_kills_its_children(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_daemon: StartDaemon,
    reap: list[int],
) -> None:
    command = hanging_command(tmp_path)
    config, _ = daemon_config(
        tmp_path,
        emulator,
        receiver,
        {"token_command": str(command), "token_command_timeout": "10m"},
    )
    relay = await start_daemon(config)
    shell, child = await command_running(tmp_path, reap)
    assert alive(child)

    relay.signal(signal.SIGTERM)
    # The watcher gets the supervisor's stop timeout (10 s) before its fetch is cancelled.
    assert await relay.wait(timeout=45) == 0
    await wait_until(
        lambda: not alive(shell) and not alive(child), timeout=10, what="no child outlives relayd"
    )
    assert "Traceback" not in relay.log.read_text()


@pytest.mark.timeout(90)
async def test_a_failing_command_never_shows_its_secrets_in_status_cli_or_log(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    http: aiohttp.ClientSession,
    start_daemon: StartDaemon,
) -> None:
    # First run: a good (short, opaque) token. Every later run fails the way a token helper
    # does, echoing the cached access token, a JWT and a refresh token on stderr.
    command = script(
        tmp_path,
        "token-helper",
        f'if [ ! -e {tmp_path}/ran ]; then touch {tmp_path}/ran; echo "{TOKEN}"; exit 0; fi\n'
        f'echo "ERROR: AADSTS700082: refresh token {OPAQUE} expired; cached {TOKEN}" >&2\n'
        f'echo "response: {{\\"access_token\\": \\"{JWT}\\"}}" >&2\n'
        "exit 3\n",
    )
    config, port = daemon_config(tmp_path, emulator, receiver, {"token_command": str(command)})
    relay = await start_daemon(config)
    await wait_until(lambda: emulator.connected("me") == 1, timeout=30, what="relay connected")
    emulator.revoke_token(TOKEN)  # Graph refuses the token: relayd runs the command again
    await emulator.kick("me")

    text, report = await wait_for_error(http, port, "exited 3", timeout=20)
    error = report["drives"]["d1"]["last_error"]
    assert "account 'test': token_command failed: exited 3: ERROR: AADSTS700082" in error
    assert REDACTED in error
    assert "response" not in error  # the first line of stderr only
    assert_no_secret(text, "/status")

    code, out, err = await asyncio.to_thread(run_cli, "status", "--config", str(config))
    assert code == 2  # not ready: the drive is reconnecting
    assert "reconnecting" in out
    assert_no_secret(out + err, "relayd status")

    relay.signal(signal.SIGTERM)
    assert await relay.wait(timeout=30) == 0
    log = relay.log.read_text()
    assert "exited 3" in log
    assert_no_secret(log, "the log")


@pytest.mark.timeout(90)
async def test_a_multi_line_token_is_a_one_line_error_without_a_traceback(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    http: aiohttp.ClientSession,
    start_daemon: StartDaemon,
) -> None:
    first, second = "first-line-of-a-token-abcdefgh", "second-line-of-a-token-ijklmnop"
    command = script(tmp_path, "two-lines", f"printf '{first}\\n{second}\\n'\n")
    config, port = daemon_config(tmp_path, emulator, receiver, {"token_command": str(command)})
    relay = await start_daemon(config)

    text, report = await wait_for_error(http, port, "more than one line", timeout=30)
    drive = report["drives"]["d1"]
    assert drive["state"] == "reconnecting"
    assert "account 'test': token_command printed more than one line" in drive["last_error"]
    assert_no_secret(text, "/status", (first, second))

    relay.signal(signal.SIGTERM)
    assert await relay.wait(timeout=30) == 0
    log = relay.log.read_text()
    assert "token_command printed more than one line" in log
    assert "Traceback" not in log
    assert_no_secret(log, "the log", (first, second))


# ---- the provider on its own: real subprocesses, no daemon ------------------------------------


async def test_a_command_that_escaped_the_group_and_holds_the_pipes_cannot_hang_the_fetch(
    tmp_path: Path, reap: list[int]
) -> None:
    # setsid: the first sleeper leaves the command's process group, so killing the group misses
    # it, and it still holds stdout and stderr. The second is the hang the timeout ends.
    command = script(
        tmp_path,
        "escaping",
        f"setsid sleep 600 &\necho $! > {tmp_path}/escaped.pid\n"
        f"sleep 600 &\necho $! > {tmp_path}/child.pid\nwait $!\n",
    )
    tokens = CommandTokenProvider("ci", str(command), timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(AuthError, match="took longer than 1s and was killed"):
            await asyncio.wait_for(tokens.token(), 30)
    finally:
        reap.extend(
            pid for name in ("escaped.pid", "child.pid") if (pid := read_pid(tmp_path / name))
        )
    assert time.monotonic() - started < 1 + 10
    child = read_pid(tmp_path / "child.pid")
    assert child is not None
    await wait_until(lambda: not alive(child), timeout=10, what="the group's sleeper gone")


async def test_a_token_printed_before_a_background_child_keeps_the_pipes_open_is_used(
    tmp_path: Path, reap: list[int]
) -> None:
    command = script(
        tmp_path, "background", f"sleep 600 &\necho $! > {tmp_path}/child.pid\necho {TOKEN}\n"
    )
    tokens = CommandTokenProvider("ci", str(command), timeout=30.0)
    try:
        assert await asyncio.wait_for(tokens.token(), 30) == TOKEN
    finally:
        reap.extend(pid for pid in [read_pid(tmp_path / "child.pid")] if pid)
    child = read_pid(tmp_path / "child.pid")
    assert child is not None
    await wait_until(lambda: not alive(child), timeout=10, what="the child holding the pipes gone")


async def test_a_cancelled_fetch_kills_the_command_group(tmp_path: Path, reap: list[int]) -> None:
    tokens = CommandTokenProvider("ci", str(hanging_command(tmp_path)), timeout=600.0)
    fetch = asyncio.create_task(tokens.token())
    shell, child = await command_running(tmp_path, reap)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(fetch, 20)
    await wait_until(lambda: not alive(shell) and not alive(child), timeout=20, what="group gone")


async def test_a_fetch_cancelled_while_the_command_starts_ends_at_once(
    tmp_path: Path, reap: list[int]
) -> None:
    """A shutdown can land while asyncio is still connecting the command's pipes. asyncio then
    kills the command alone and waits for its pipes, which the wrapper's child holds: the
    fetch, and relayd's shutdown with it, hung until that child exited (600 s here)."""
    tokens = CommandTokenProvider("ci", str(hanging_command(tmp_path)), timeout=600.0)
    fetch = asyncio.create_task(tokens.token())
    # One turn of the loop, not a wait: the fetch runs up to the start's pipe connection (the
    # process exists by then, the pipes are connected only on later turns), and is cancelled
    # exactly there.
    await asyncio.sleep(0)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(fetch, 20)
    for name in ("shell.pid", "child.pid"):
        pid = read_pid(tmp_path / name)
        if pid is not None:
            reap.append(pid)
            await wait_until(lambda pid=pid: not alive(pid), timeout=20, what=f"{name} gone")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("abc\ndef\n", "account 'ci': token_command printed more than one line"),
        ("abc def\n", "account 'ci': token_command's output contains characters that cannot"),
        ("\n\n", "account 'ci': token_command gave no token"),
    ],
)
async def test_what_a_command_printed_is_checked_and_never_echoed(
    tmp_path: Path, output: str, message: str
) -> None:
    (tmp_path / "out").write_text(output)
    tokens = CommandTokenProvider("ci", f"cat {tmp_path / 'out'}")
    with pytest.raises(AuthError) as raised:
        await tokens.token()
    assert message in str(raised.value)
    assert "abc" not in str(raised.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("abc\ndef\n", "holds more than one line"),
        ("abc\tdef", "contains characters that cannot be a bearer token"),
        ("", "is empty"),
    ],
)
async def test_a_bad_token_file_is_named_and_not_echoed(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "graph-token"
    path.write_text(content)
    with pytest.raises(AuthError) as raised:
        await FileTokenProvider("side", path).token()
    assert str(raised.value) == f"account 'side': token_file {str(path)!r} {problem}"


async def test_a_failing_command_reports_its_exit_and_first_stderr_line_redacted(
    tmp_path: Path,
) -> None:
    command = script(
        tmp_path,
        "fails",
        f"printf '\\033[31mERROR: denied {OPAQUE}\\033[0m\\n' >&2\n"
        "echo 'second line' >&2\nexit 7\n",
    )
    with pytest.raises(AuthError) as raised:
        await CommandTokenProvider("ci", str(command)).token()
    assert (
        str(raised.value)
        == f"account 'ci': token_command failed: exited 7: ERROR: denied {REDACTED}"
    )


async def test_the_last_good_token_is_masked_even_when_short(tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    command = script(
        tmp_path,
        "then-fails",
        f"if [ ! -e {flag} ]; then touch {flag}; echo short-tok; exit 0; fi\n"
        'echo "cannot refresh short-tok" >&2\nexit 1\n',
    )
    tokens = CommandTokenProvider("ci", str(command))
    token = await tokens.token()
    assert token == "short-tok"
    with pytest.raises(AuthError) as raised:
        await tokens.token(refused=token)
    assert str(raised.value).endswith(f"exited 1: cannot refresh {REDACTED}")


# ---- pure parts -------------------------------------------------------------------------------


def test_stderr_summary_is_the_first_line_redacted_and_capped() -> None:
    assert stderr_summary("") == "nothing on stderr"
    assert stderr_summary("\n  \nfirst\nsecond\n") == "first"
    long = stderr_summary("word " * 200)
    assert len(long) == STDERR_SHOWN and long.endswith("...")
    # Redacted before cut: the token straddling the cap is not half shown.
    capped = stderr_summary("x " * 90 + JWT)
    assert JWT[:10] not in capped
    assert stderr_summary(f"\x1b[31mbad {OPAQUE}\x1b[0m") == f"bad {REDACTED}"


def test_token_problem() -> None:
    assert token_problem(f"  {JWT}\n") is None
    assert token_problem("EwBwA8l6BAAU+/abc==\n") is None
    assert token_problem("a\nb") is TokenProblem.LINES
    assert token_problem("a\r\nb") is TokenProblem.LINES
    assert token_problem("a b") is TokenProblem.CHARACTERS
    assert token_problem("tök") is TokenProblem.CHARACTERS
    assert token_problem("Bearer\x00") is TokenProblem.CHARACTERS
    assert token_problem(" \n") is TokenProblem.EMPTY


# ---- config -----------------------------------------------------------------------------------


def test_token_command_timeout_is_a_duration_for_token_command_accounts_only(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    config = relay_config(tmp_path, emulator, receiver)
    assert config.accounts["test"].token_command_timeout == 60.0  # the default

    def parse(account: dict[str, Any]) -> Any:
        document = relay_document(tmp_path, emulator, receiver)
        document["accounts"] = {"test": account}
        return parse_config(yaml.safe_dump(document), filename="c.yaml", env={}, base_dir=tmp_path)

    account = parse({"token_command": "echo t", "token_command_timeout": "90s"}).accounts["test"]
    assert account.token_command_timeout == 90.0
    assert CommandTokenProvider.from_config("test", account)._timeout == 90.0
    with pytest.raises(ConfigError) as raised:
        parse({"token_file": "token", "token_command_timeout": "5s"})
    assert "accounts.test.token_command_timeout: only applies to token_command accounts" in str(
        raised.value
    )
    with pytest.raises(ConfigError) as raised:
        parse({"token_command": "echo t", "token_command_timeout": "0s"})
    assert "accounts.test.token_command_timeout" in str(raised.value)
    with pytest.raises(ConfigError):
        parse({"token_command": "echo t", "token_command_timeout": "soon"})
