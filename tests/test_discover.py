"""`relayd discover`: what an account can watch, printed as a `drives:` block that works pasted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import StartRelay, relay_config, wait_notifications
from support.configs import TOKEN, relay_document
from support.tls import Authority
from test_cli import run_cli

from relayd.config import is_name
from relayd.discover import slug, unique_names
from relayd.emulator import GraphEmulator, WebhookReceiver


def test_names_are_valid_unique_and_avoid_the_ones_taken() -> None:
    assert slug("Engineering / Documents") == "engineering-documents"
    assert slug("Équipe Sécurité") == "equipe-securite"
    assert slug("..//..") == "drive"
    assert slug("x" * 100) == "x" * 64
    names = unique_names(
        ["Sales", "sales", "SALES!", "日本語", "日本語", "x" * 100, "x" * 100],
        taken=["sales"],
    )
    assert names == ["sales-2", "sales-3", "sales-4", "drive", "drive-2", "x" * 64, "x" * 62 + "-2"]
    assert all(is_name(name) for name in names)


def write_config(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def discover(config: Path, *args: str) -> tuple[int, str, str]:
    # In a thread: the emulator answering the subprocess runs on this test's event loop.
    return await asyncio.to_thread(
        run_cli, "discover", "--config", str(config), "--account", "test", *args
    )


@pytest.fixture
def tenant(emulator: GraphEmulator) -> dict[str, Any]:
    """A user who follows two sites (one now forbidden), can find a third, and is in groups."""
    emulator.list_page_size = 2  # every listing comes in pages
    return {
        "engineering": emulator.add_site("Engineering", ["Documents", "Specs", "Archive"]),
        "secret": emulator.add_site("Secret Project", forbidden=True),
        "marketing": emulator.add_site("Marketing", followed=False),
        "team": emulator.add_group("Rocket Team", team=True),
        "group": emulator.add_group("Sales"),
        "security": emulator.add_group("Firewall Admins", unified=False),
    }


@pytest.mark.timeout(90)
async def test_discover_prints_a_block_that_check_config_accepts_and_that_relays(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    tenant: dict[str, Any],
) -> None:
    document = relay_document(tmp_path, emulator, receiver)
    document["drives"] = []
    config = write_config(tmp_path, document)

    code, out, err = await discover(config, "--search", "market")
    assert code == 0, err
    assert TOKEN not in out + err
    # The forbidden site is skipped with a note naming it; the rest is listed.
    assert "skipped site 'Secret Project'" in err
    assert "403 accessDenied" in err
    block = yaml.safe_load(out)
    drives = block["drives"]
    expected = {
        f"drives/{emulator.drive_id('me')}",
        *tenant["engineering"].drives,
        *tenant["marketing"].drives,
        f"drives/{emulator.drive_id(tenant['team'])}",
        f"drives/{emulator.drive_id(tenant['group'])}",
    }
    assert {d["resource"] for d in drives} == expected
    assert len(drives) == len(expected)  # each once
    assert {d["account"] for d in drives} == {"test"}
    assert {d["webhook"] for d in drives} == {"hook"}
    names = [d["name"] for d in drives]
    assert len(set(names)) == len(names)
    assert "engineering-specs" in names and "rocket-team" in names
    assert "https://emulator.sharepoint.com/sites/Engineering/Specs" in out  # for people

    # Pasted into the config as it is: accepted, and it connects and relays.
    document["drives"] = drives
    config.write_text(yaml.safe_dump(document))
    code, checked, err = await asyncio.to_thread(run_cli, "check-config", "--config", str(config))
    assert code == 0, err
    assert f"{len(drives)} drives" in checked
    looked_up = dict(emulator.drive_lookups)  # by discover itself
    relay = await start_relay(relay_config(tmp_path, emulator, receiver, drives=drives))
    for name in names:
        await relay.connected(name)
    assert emulator.drive_lookups == looked_up  # ids already: the relay resolves nothing
    specs = next(d for d in drives if d["name"] == "engineering-specs")
    await emulator.emit(specs["resource"])
    [delivered] = await wait_notifications(receiver, 1)
    assert delivered.json()["data"]["drive"] == "engineering-specs"


@pytest.mark.timeout(60)
async def test_drives_already_configured_are_left_out_and_names_do_not_clash(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    site = emulator.add_site("Engineering")
    document = relay_document(tmp_path, emulator, receiver)
    document["drives"] = [
        {"name": "onedrive", "account": "test", "resource": site.drives[0], "webhook": "hook"}
    ]
    document["webhooks"]["other"] = {"url": receiver.url("other")}
    config = write_config(tmp_path, document)

    code, out, err = await discover(config)
    assert code == 0, err
    assert "already in the config as 'onedrive'" in out
    [found] = yaml.safe_load(out)["drives"]
    assert found["resource"] == f"drives/{emulator.drive_id('me')}"
    assert found["name"] == "onedrive-2"
    # Two webhooks: a placeholder that check-config refuses, and a comment saying what to pick.
    assert found["webhook"] == "CHANGE-ME"
    assert "replace CHANGE-ME with one of hook, other" in out


@pytest.mark.timeout(60)
async def test_a_refused_token_names_the_account_and_request(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    emulator.revoke_token(TOKEN)
    config = write_config(tmp_path, relay_document(tmp_path, emulator, receiver))
    code, out, err = await discover(config)
    assert code == 1
    assert out == ""
    assert "relayd: discover: account 'test': GET /v1.0/me/drive:" in err
    assert "401 InvalidAuthenticationToken" in err
    assert TOKEN not in err

    (tmp_path / "token").unlink()  # no token at all: the account's own error, said once
    code, out, err = await discover(config)
    assert code == 1
    assert out == ""
    assert err.startswith("relayd: discover: account 'test': ")
    assert err.count("account 'test'") == 1

    code, _, err = await asyncio.to_thread(
        run_cli, "discover", "--config", str(config), "--account", "nobody"
    )
    assert code == 1
    assert "no account 'nobody' in the config (accounts: test)" in err


@pytest.mark.timeout(60)
async def test_the_listing_follows_every_page(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    emulator.list_page_size = 1
    sites = [emulator.add_site(f"Site {n}", ["Documents", "Extra"]) for n in range(5)]
    config = write_config(tmp_path, {**relay_document(tmp_path, emulator, receiver), "drives": []})
    code, out, err = await discover(config)
    assert code == 0, err
    resources = {d["resource"] for d in yaml.safe_load(out)["drives"]}
    assert resources >= {drive for site in sites for drive in site.drives}
    assert emulator.graph_paths["/v1.0/me/followedSites"] == 5
    assert all(emulator.graph_paths[f"/v1.0/sites/{site.id}/drives"] == 2 for site in sites)


@pytest.mark.timeout(60)
async def test_discover_trusts_what_the_daemon_trusts_and_names_an_untrusted_host(
    tmp_path: Path, ca: Authority, tls_emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    site = tls_emulator.add_site("Engineering")
    document = {**relay_document(tmp_path, tls_emulator, receiver), "drives": []}
    assert document["graph"]["base_url"].startswith("https://")
    config = write_config(tmp_path, document)
    code, _, err = await discover(config)  # the test CA is trusted by nothing yet
    assert code == 1
    assert "relayd: discover: account 'test': GET /v1.0/me/drive: cannot reach Graph:" in err
    assert f"TLS certificate of 127.0.0.1:{tls_emulator.port} is not trusted" in err

    document["tls"] = {"ca_file": str(ca.ca_file)}
    config = write_config(tmp_path, document)
    code, out, err = await discover(config)
    assert code == 0, err
    assert {d["resource"] for d in yaml.safe_load(out)["drives"]} == {
        f"drives/{tls_emulator.drive_id('me')}",
        *site.drives,
    }


@pytest.mark.timeout(60)
async def test_a_drive_configured_as_me_is_known_once_relayd_has_resolved_it(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
) -> None:
    site = emulator.add_site("Engineering")
    relay = await start_relay()  # d1 is `resource: me`: looked up and stored in state_dir
    await relay.connected()
    await relay.stop()
    config = write_config(tmp_path, relay_document(tmp_path, emulator, receiver))

    code, out, err = await discover(config)
    assert code == 0, err
    assert "already in the config as 'd1'" in out
    # Only the library is new: the OneDrive is the drive d1 already watches.
    assert [d["resource"] for d in yaml.safe_load(out)["drives"]] == list(site.drives)
