"""`relayd doctor`: a line per check of what the config needs here and now; exit 1 on a failure."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.configs import TOKEN, relay_document
from support.daemon import free_port
from support.tls import Authority

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.store import open_store


async def doctor(config: Path) -> tuple[int, list[str]]:
    """`relayd doctor` as a user runs it; the emulator answers from this test's loop meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "doctor",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "RELAYD_CONFIG": ""},
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines()


def write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def line_of(lines: list[str], subject: str) -> str:
    words = subject.split()  # "account test" or "state_dir": the words after the verdict
    found = [line for line in lines if line.split()[1 : 1 + len(words)] == words]
    assert len(found) == 1, (subject, lines)
    return found[0]


@pytest.mark.timeout(90)
async def test_a_working_setup_passes_every_check(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    document = relay_document(tmp_path, emulator, receiver)
    document["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    code, lines = await doctor(write(tmp_path, document))
    assert code == 0, lines
    assert all(line.startswith("ok ") for line in lines), lines
    assert "token accepted by Graph (GET /me/drive)" in line_of(lines, "account test")
    assert f"127.0.0.1:{receiver.port} answers" in line_of(lines, "webhook hook")
    assert "will be created" in line_of(lines, "state_dir")
    assert "is free" in line_of(lines, "admin")
    assert TOKEN not in "\n".join(lines)


@pytest.mark.timeout(90)
async def test_a_token_graph_refuses_and_a_webhook_that_does_not_answer_fail(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver
) -> None:
    emulator.revoke_token(TOKEN)  # the token file still gives one: `relayd accounts` says ok
    dead = free_port()
    document = relay_document(
        tmp_path,
        emulator,
        receiver,
        webhooks={"hook": {"url": f"http://127.0.0.1:{dead}/hook?key=SECRETKEY"}},
    )
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    code, lines = await doctor(write(tmp_path, document))
    assert code == 1, lines
    account = line_of(lines, "account test")
    assert account.startswith("FAIL ")
    assert "Graph refused it for drive d1" in account and "401" in account
    webhook = line_of(lines, "webhook hook")
    assert webhook.startswith("FAIL ") and f"127.0.0.1:{dead}: cannot connect" in webhook
    assert line_of(lines, "state_dir").startswith("FAIL ")
    assert "chmod 0700" in line_of(lines, "state_dir")
    output = "\n".join(lines)
    assert TOKEN not in output and "SECRETKEY" not in output


@pytest.mark.timeout(90)
async def test_over_tls_the_ca_file_decides_and_an_untrusted_certificate_is_named(
    tmp_path: Path, tls_emulator: GraphEmulator, tls_receiver: WebhookReceiver, ca: Authority
) -> None:
    document = relay_document(tmp_path, tls_emulator, tls_receiver)
    code, lines = await doctor(write(tmp_path, document))  # the system's CAs only
    assert code == 1
    webhook = line_of(lines, "webhook hook")
    assert webhook.startswith("FAIL ") and "TLS certificate not trusted" in webhook
    assert "tls.ca_file adds a CA" in webhook
    account = line_of(lines, "account test")
    assert account.startswith("FAIL ") and "is not trusted" in account

    document["tls"] = {"ca_file": str(ca.ca_file)}
    code, lines = await doctor(write(tmp_path, document))
    assert code == 0, lines
    assert "(TLS certificate valid)" in line_of(lines, "webhook hook")


@pytest.mark.timeout(90)
async def test_a_postgresql_store_is_checked_reachable_without_showing_its_password(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, postgres_url: str
) -> None:
    password = "pw-doctor-never-shown"
    with_password = postgres_url.replace("relayd@", f"relayd:{password}@", 1)
    document = relay_document(tmp_path, emulator, receiver, store={"url": with_password})
    code, lines = await doctor(write(tmp_path, document))
    assert code == 0, lines
    assert "reachable; empty: relayd creates its tables at start" in line_of(lines, "store")
    assert postgres_url in line_of(lines, "store")

    async with open_store(with_password, tmp_path / "state", recover=False):
        pass  # the first start: the schema is made
    code, lines = await doctor(write(tmp_path, document))
    assert code == 0, lines
    assert "reachable, schema 1" in line_of(lines, "store")

    nowhere = f"postgresql://relayd:{password}@127.0.0.1:{free_port()}/relayd"
    document["store"] = {"url": nowhere}
    code, lines = await doctor(write(tmp_path, document))
    assert code == 1
    assert "cannot connect" in line_of(lines, "store")
    assert password not in "\n".join(lines)
