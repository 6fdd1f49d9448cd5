"""Device-code sign-in and silent refresh through the real MSAL code paths, without a network.

MSAL is given a fake login service (tests/support/token_endpoint.py) as its HTTP client, so
discovery, the device-code flow, refresh-token grants and their errors are MSAL's own handling of
realistic answers. Token caches live in each test's temporary state_dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartRelay, relay_config
from structlog.testing import capture_logs
from support.token_endpoint import (
    DEVICE_CODE_GRANT,
    FAKE_AUTHORITY_HOST,
    FakeLoginService,
    User,
    make_jwt,
)
from support.waiting import wait_until

from relayd import auth, cli, watcher
from relayd.auth import (
    AuthError,
    MsalAccount,
    MsalTokenProvider,
    cache_path,
    jwt_claims,
    jwt_expiry,
)
from relayd.config import AccountConfig, ConfigError, load_config
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.watcher import DriveState

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
ADA = User("ada@contoso.example")
BOB = User("bob@fabrikam.example")


@pytest.fixture
def service() -> Iterator[FakeLoginService]:
    fake = FakeLoginService(user=ADA)
    yield fake
    assert fake.unexpected == [], "MSAL asked the fake for something it does not serve"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def msal_account() -> AccountConfig:
    return AccountConfig(client_id=CLIENT_ID, authority_host=FAKE_AUTHORITY_HOST)


def sign_in(service: FakeLoginService, state_dir: Path, name: str = "work") -> list[str]:
    """`relayd login` for account `name`, as whoever service.user is; returns what was shown."""
    shown: list[str] = []
    user = auth.login(
        name, msal_account(), state_dir, show=shown.append, http_client=service.http_client()
    )
    assert user == service.user.username
    return shown


def provider(service: FakeLoginService, state_dir: Path, name: str = "work") -> MsalTokenProvider:
    return MsalTokenProvider(name, msal_account(), state_dir, http_client=service.http_client())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- login, storage, reuse ------------------------------------------------------------------


async def test_device_code_login_is_stored_and_reused_after_a_restart(
    service: FakeLoginService, state_dir: Path
) -> None:
    service.pending_polls = 2  # the person types the code while MSAL polls
    [message] = sign_in(service, state_dir)
    assert "FAKE0001" in message
    assert f"{FAKE_AUTHORITY_HOST}/devicelogin" in message
    assert service.grants(DEVICE_CODE_GRANT) == 3  # pending, pending, signed in
    assert cache_path(state_dir, "work").exists()

    first = await provider(service, state_dir).token()
    assert first == service.issued_access_tokens[-1]  # the login's token, from the cache
    assert len(first.split(".")) == 3
    assert jwt_expiry(first) is not None

    # A new process: a new provider reading the same file, with no sign-in and no refresh.
    again = await provider(service, state_dir).token()
    assert again == first
    assert service.grants("refresh_token") == 0
    assert [call.path for call in service.calls].count("/organizations/oauth2/v2.0/devicecode") == 1


async def test_the_cache_file_is_private_and_replaced_atomically(
    service: FakeLoginService, state_dir: Path
) -> None:
    service.access_lifetime = 120  # each token call refreshes, i.e. rewrites the file
    previous = os.umask(0)  # the file's privacy must not depend on the umask
    try:
        sign_in(service, state_dir)
        path = cache_path(state_dir, "work")
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
        assert mode(path.with_name(path.name + ".lock")) == 0o600
        before = path.stat().st_ino

        await provider(service, state_dir).token()
        assert service.grants("refresh_token") == 1
        assert path.stat().st_ino != before  # replaced, not rewritten in place
        assert mode(path) == 0o600
    finally:
        os.umask(previous)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "work.msal.json",
        "work.msal.json.lock",
    ]
    assert json.loads(path.read_text())["Account"]  # MSAL's own serialisation


async def test_a_login_during_a_refresh_is_not_overwritten_by_it(
    service: FakeLoginService, state_dir: Path
) -> None:
    service.access_lifetime = 120
    sign_in(service, state_dir)
    tokens = provider(service, state_dir)
    gate = service.hold_refreshes()
    refreshing = asyncio.create_task(tokens.token())
    await wait_until(service.refresh_waiting.is_set, what="the daemon refreshing, cache locked")

    # `relayd login` as Bob finishes its device-code flow meanwhile; storing it must wait for
    # the daemon's read-modify-write, or the daemon's save would put Ada's sign-in back.
    service.user = BOB
    polls = service.grants(DEVICE_CODE_GRANT)
    login = asyncio.create_task(asyncio.to_thread(sign_in, service, state_dir))
    await wait_until(lambda: service.grants(DEVICE_CODE_GRANT) == polls + 2, what="Bob signed in")
    gate.set()
    await asyncio.gather(refreshing, login)

    assert MsalAccount("work", msal_account(), state_dir).cached_username() == BOB.username
    claims = jwt_claims(await tokens.token()) or {}
    assert claims["upn"] == BOB.username  # and the daemon moved over to it


async def test_a_token_is_reused_until_it_is_near_expiry(
    service: FakeLoginService, state_dir: Path
) -> None:
    sign_in(service, state_dir)
    tokens = provider(service, state_dir)
    first = await tokens.token()
    calls = len(service.calls)
    assert await tokens.token() == first
    assert len(service.calls) == calls  # held in memory: not even a cache lookup over HTTP


async def test_a_token_near_expiry_is_refreshed_silently_and_the_rolled_refresh_token_kept(
    service: FakeLoginService, state_dir: Path
) -> None:
    # Tokens that live two minutes are inside the five-minute refresh margin from the start:
    # "near expiry" without waiting for a clock.
    service.access_lifetime = 120
    sign_in(service, state_dir)
    from_login = service.issued_access_tokens[-1]
    tokens = provider(service, state_dir)

    first = await tokens.token()
    assert first != from_login
    assert service.grants("refresh_token") == 1
    second = await tokens.token()
    assert second not in (first, from_login)
    assert service.grants("refresh_token") == 2

    # The fake honours each refresh token once, like a rolled one: a restart works only if the
    # newest one reached the file.
    after_restart = await provider(service, state_dir).token()
    assert after_restart not in (first, second)
    assert service.grants("refresh_token") == 3


async def test_a_refused_token_forces_one_refresh_for_all_drives(
    service: FakeLoginService, state_dir: Path
) -> None:
    sign_in(service, state_dir)
    tokens = provider(service, state_dir)
    old = await tokens.token()

    # Two drives hear 401 for the same token at once; MSAL's refresh is held at the service
    # until both have asked, which also shows the event loop runs while MSAL blocks.
    gate = service.hold_refreshes()
    drives = [asyncio.create_task(tokens.token(refused=old)) for _ in range(2)]
    await wait_until(service.refresh_waiting.is_set, what="a refresh under way")
    gate.set()
    new, same = await asyncio.gather(*drives)
    assert new == same != old
    assert service.grants("refresh_token") == 1
    # A late 401 for the old token gets the new one, with no second refresh.
    assert await tokens.token(refused=old) == new
    assert service.grants("refresh_token") == 1


async def test_a_token_refused_after_a_restart_is_not_handed_out_again(
    service: FakeLoginService, state_dir: Path
) -> None:
    sign_in(service, state_dir)
    cached = await provider(service, state_dir).token()
    # The restarted daemon has never handed out `cached`, but MSAL's cache still holds it.
    fresh = await provider(service, state_dir).token(refused=cached)
    assert fresh != cached
    assert service.grants("refresh_token") == 1


# ---- when a person has to sign in again -----------------------------------------------------


async def test_a_refused_refresh_token_needs_login_for_that_account_only(
    service: FakeLoginService, state_dir: Path
) -> None:
    service.access_lifetime = 120  # every token call goes to the refresh token
    sign_in(service, state_dir, "work")
    service.user = BOB
    sign_in(service, state_dir, "home")
    work, home = provider(service, state_dir, "work"), provider(service, state_dir, "home")
    await work.token()
    await home.token()

    service.revoke(ADA.username)  # e.g. Ada changed her password
    with capture_logs() as logged:
        for _ in range(3):  # the drives' retries
            with pytest.raises(AuthError) as refused:
                await work.token()
            assert refused.value.needs_login
            assert str(refused.value) == (
                "account 'work' needs `relayd login work` again: invalid_grant (AADSTS700082)"
            )
        assert (await home.token()).count(".") == 2
    warnings = [entry for entry in logged if entry["event"] == "account needs sign-in"]
    assert len(warnings) == 1  # once, not once per retry
    assert warnings[0]["account"] == "work"
    assert warnings[0]["log_level"] == "error"
    secrets = service.issued_access_tokens + service.issued_refresh_tokens
    assert not any(secret in repr(logged) for secret in secrets)


async def test_an_outage_of_the_sign_in_service_is_not_a_reason_to_sign_in_again(
    service: FakeLoginService, state_dir: Path
) -> None:
    service.access_lifetime = 120
    sign_in(service, state_dir)
    service.outage = True
    with capture_logs() as logged, pytest.raises(AuthError) as failed:
        await provider(service, state_dir).token()
    assert not failed.value.needs_login  # the drive backs off and retries as for any outage
    assert str(failed.value).startswith(
        f"account 'work': cannot use the sign-in service at {FAKE_AUTHORITY_HOST}/organizations: "
    )
    assert "503" in str(failed.value)
    assert logged == []  # the watcher reports its retries; nothing asks a person to act


async def test_a_login_while_the_daemon_runs_is_picked_up(
    service: FakeLoginService, state_dir: Path
) -> None:
    tokens = provider(service, state_dir)
    with pytest.raises(AuthError) as missing:
        await tokens.token()
    assert missing.value.needs_login
    assert str(missing.value) == "account 'work' is not signed in: run `relayd login work`"
    assert service.calls == []  # nothing to refresh: the service was not even asked

    sign_in(service, state_dir)  # `relayd login work`, while the provider lives on
    assert await tokens.token() == service.issued_access_tokens[-1]

    # Later the refresh token dies and someone signs in again, as another user.
    service.access_lifetime = 120
    sign_in(service, state_dir)
    service.revoke(ADA.username)
    with pytest.raises(AuthError, match="invalid_grant"):
        await tokens.token()
    service.user = BOB
    with capture_logs() as logged:
        sign_in(service, state_dir)
        recovered = await tokens.token()
    assert recovered == service.issued_access_tokens[-1]
    assert [entry["event"] for entry in logged] == ["account signed in again"]
    assert logged[0]["user"] == BOB.username


async def test_logout_forgets_the_sign_in(service: FakeLoginService, state_dir: Path) -> None:
    sign_in(service, state_dir)
    tokens = provider(service, state_dir)
    await tokens.token()
    assert auth.logout("work", msal_account(), state_dir) is True
    assert not cache_path(state_dir, "work").exists()
    with pytest.raises(AuthError, match="not signed in") as gone:
        await tokens.token()  # the token held in memory is dropped too
    assert gone.value.needs_login
    assert auth.logout("work", msal_account(), state_dir) is False


async def test_a_failed_device_code_sign_in_stores_nothing(
    service: FakeLoginService, state_dir: Path
) -> None:
    service.device_flow_outcome = "expired_token"  # nobody typed the code in time
    with pytest.raises(AuthError, match=r"^account 'work': sign-in failed: expired_token"):
        sign_in(service, state_dir)
    assert not cache_path(state_dir, "work").exists()


async def test_an_unreadable_cache_needs_login(service: FakeLoginService, state_dir: Path) -> None:
    sign_in(service, state_dir)
    cache_path(state_dir, "work").write_text("{not json")
    with pytest.raises(AuthError, match=r"token cache .* is unreadable") as broken:
        await provider(service, state_dir).token()
    assert broken.value.needs_login


def test_the_authority_is_the_configured_host_and_tenant(state_dir: Path) -> None:
    us_gov = AccountConfig(
        client_id=CLIENT_ID,
        authority_host="https://login.microsoftonline.us/",
        tenant="contoso.onmicrosoft.us",
    )
    account = MsalAccount("gov", us_gov, state_dir)  # builds nothing yet: no network
    assert account.authority == "https://login.microsoftonline.us/contoso.onmicrosoft.us"
    assert account.scopes == ["Files.Read"]


# ---- the daemon -----------------------------------------------------------------------------


async def test_a_drive_waits_for_login_then_connects(
    service: FakeLoginService,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "default_http_client", service.http_client())
    monkeypatch.setattr(watcher, "NEEDS_LOGIN_RETRY", 0.0)
    service.on_access_token = emulator.accept_token  # Graph accepts what the service issues
    account = {"client_id": CLIENT_ID, "authority_host": FAKE_AUTHORITY_HOST}
    config = relay_config(tmp_path, emulator, receiver, accounts={"test": account})
    relay = await start_relay(config)
    await wait_until(
        lambda: relay.watcher().status.state is DriveState.NEEDS_LOGIN, what="needs login"
    )
    assert "relayd login test" in (relay.watcher().status.last_error or "")

    sign_in(service, config.state_dir, "test")
    await wait_until(
        lambda: relay.watcher().status.state is DriveState.CONNECTED, what="drive connected"
    )
    assert emulator.connected("me") == 1


# ---- the CLI --------------------------------------------------------------------------------


async def test_login_accounts_and_logout_commands(
    service: FakeLoginService,
    emulator: GraphEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(auth, "default_http_client", service.http_client())
    piped = make_jwt({"exp": 4102444800, "upn": "ci@contoso.example", "scp": "Files.Read.All"})
    (tmp_path / "token").write_text(piped)
    # `relayd accounts` asks Graph (the emulator) whether it takes each token.
    service.on_access_token = emulator.accept_token
    for token in (piped, "opaque-token"):
        emulator.accept_token(token)
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            graph: {{base_url: "{emulator.base_url}"}}
            state_dir: state
            accounts:
              work:
                client_id: {CLIENT_ID}
                authority_host: {FAKE_AUTHORITY_HOST}
                scopes: Files.Read Sites.Read.All
              home:
                client_id: {CLIENT_ID}
                authority_host: {FAKE_AUTHORITY_HOST}
                tenant: consumers
              ci:
                token_command: {sys.executable} -c "print('opaque-token')"
              piped:
                token_file: token
            """
        )
    )

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli.main, [*argv, "--config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await run("login", "work")
    assert code == 0
    assert "enter the code FAKE" in out
    assert out.rstrip().endswith(
        "account 'work' is signed in as ada@contoso.example; a running relayd uses it from now on"
    )

    code, out, _ = await run("accounts")
    assert code == 1  # home is not signed in
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == ["account", "kind", "user", "scopes", "status"]
    assert rows["work"].split()[:6] == [
        "work",
        "msal",
        "ada@contoso.example",
        "Files.Read",
        "Sites.Read.All",
        "ok:",
    ]
    assert "silent refresh works, Graph accepts the token" in rows["work"]
    assert service.grants("refresh_token") == 1  # the check really refreshed
    assert rows["home"].split()[1:4] == ["msal", "-", "Files.Read"]
    assert rows["home"].endswith("account 'home' is not signed in: run `relayd login home`")
    assert rows["ci"].split()[1:5] == ["command", "-", "-", "ok:"]
    assert rows["piped"].split()[1:5] == ["file", "ci@contoso.example", "Files.Read.All", "ok:"]
    assert "2100-01-01 00:00:00Z" in rows["piped"]

    # A token its source still gives, but that Graph no longer takes, is not "ok".
    emulator.revoke_token("opaque-token")
    code, out, _ = await run("accounts")
    assert code == 1
    ci = next(line for line in out.splitlines() if line.startswith("ci "))
    assert "token obtained, but Graph refused it for its own drive: Graph answered 401" in ci

    service.revoke(ADA.username)
    code, out, _ = await run("accounts")
    assert code == 1
    work = next(line for line in out.splitlines() if line.startswith("work "))
    assert "ada@contoso.example" in work  # who was signed in is still shown
    assert work.endswith(
        "account 'work' needs `relayd login work` again: invalid_grant (AADSTS700082)"
    )

    assert (await run("logout", "work"))[:2] == (
        0,
        "account 'work' is signed out; its drives wait for `relayd login`\n",
    )
    assert (await run("logout", "work"))[:2] == (0, "account 'work' was not signed in\n")
    code, _, err = await run("login", "ci")
    assert (code, err) == (
        1,
        "relayd: account 'ci' gets its tokens from token_command: it has no sign-in\n",
    )
    code, _, err = await run("login", "nobody")
    assert code == 1
    assert err == "relayd: no account 'nobody' in the config (accounts: ci, home, piped, work)\n"


# ---- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["client_secret", "certificate_path"])
def test_application_credentials_are_refused_with_a_clear_message(tmp_path: Path, key: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"accounts:\n  work:\n    client_id: {CLIENT_ID}\n    {key}: do-not-print-me\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert str(refused.value) == (
        f"{config}:4: accounts.work.{key}: application credentials are not accepted: Graph's "
        "socketIo endpoint only accepts delegated (user) tokens; use client_id for device-code "
        "sign-in (relayd login) or token_command/token_file"
    )
    assert "do-not-print-me" not in str(refused.value)
