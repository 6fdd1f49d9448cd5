"""Delivery end to end: emulator -> relay (real supervisor, real outbox) -> scripted receiver."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import Relay, StartRelay, seqs
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from structlog.testing import capture_logs
from support.configs import FAST_RETRY
from support.delivery_helpers import (
    count,
    new_secret,
    run_cli,
    write_config,
)
from support.stores import Backend
from support.waiting import eventually, wait_until

import relayd.store.sqlite
from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.receiver import ReceivedRequest, ScriptedResponse
from relayd.store import Filter, NewDelivery, State, Store

# Every test on both stores (support.stores), the SQLite-only ones marked so.
pytestmark = pytest.mark.usefixtures("store_backend")


async def relay_ready(relay: Relay, emulator: GraphEmulator) -> Store:
    """Wait until the relay listens to the drive; return its outbox."""
    await wait_until(lambda: emulator.connected("me") == 1, what="relay connected")
    assert relay.supervisor.outbox is not None
    return relay.supervisor.outbox


async def settle(outbox: Store, webhook: str, state: State, expected: int) -> None:
    async def reached() -> bool:
        return await count(outbox, webhook, state) == expected

    await eventually(reached, what=f"{expected} {state.value} rows for {webhook}")


def by_message(requests: list[ReceivedRequest]) -> dict[str, list[ReceivedRequest]]:
    grouped: dict[str, list[ReceivedRequest]] = defaultdict(list)
    for request in requests:
        grouped[request.headers["webhook-id"]].append(request)
    return grouped


def delivered(receiver: WebhookReceiver, name: str = "hook") -> set[str]:
    """The webhook-ids the receiver answered with 200."""
    return {
        r.headers["webhook-id"] for r in receiver.requests if r.name == name and r.status == 200
    }


def on(receiver: WebhookReceiver, name: str) -> list[ReceivedRequest]:
    return [r for r in receiver.requests if r.name == name]


# -- outages and retries ------------------------------------------------------------------------


async def test_a_webhook_down_for_a_while_gets_every_notification_once_byte_for_byte(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    n = 10
    receiver.set_default("hook", ScriptedResponse(503))
    relay = await start_relay()
    outbox = await relay_ready(relay, emulator)

    await emulator.emit("me", n)
    await wait_until(lambda: len(receiver.requests) >= 3 * n, what="a few 503s for each")
    # Then not even listening: every attempt is refused.
    await receiver.stop()

    async def all_refused() -> bool:
        rows = await outbox.rows()
        return len(rows) == n and all(
            row["last_status"] is None and row["last_error"] for row in rows
        )

    await eventually(all_refused, what="an attempt of each refused by the closed port")
    receiver.set_default("hook", ScriptedResponse(200))
    await receiver.start()

    delivered = await receiver.wait_for(n)
    await settle(outbox, "hook", State.DELIVERED, n)  # nothing left to send: no later duplicate

    assert len(receiver.delivered("hook")) == n
    assert len({r.headers["webhook-id"] for r in delivered}) == n == emulator.emitted["me"]
    assert sorted(seqs(delivered)) == list(range(1, n + 1))
    for message_id, attempts in by_message(receiver.requests).items():
        assert len(attempts) >= 4, message_id
        assert {a.body for a in attempts} == {attempts[0].body}, message_id


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured_over_a_shorter_backoff(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay, status: int
) -> None:
    receiver.script("hook", [ScriptedResponse(status, headers={"Retry-After": "1"})])
    relay = await start_relay(
        webhooks={
            "hook": {"url": receiver.url("hook"), "retry": {"initial_delay": 0.05, "max_delay": 5}}
        }
    )
    await relay_ready(relay, emulator)

    await emulator.emit("me")
    await receiver.wait_for(1)

    first, second = receiver.requests
    assert (first.status, second.status) == (status, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert 1.0 <= second.at - first.at < 2.5


async def test_max_age_turns_a_retrying_notification_into_a_dead_letter(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    receiver.set_default("hook", ScriptedResponse(503))
    retry = {"initial_delay": 0.05, "max_delay": 0.2, "max_age": 1}
    relay = await start_relay(webhooks={"hook": {"url": receiver.url("hook"), "retry": retry}})
    outbox = await relay_ready(relay, emulator)

    await emulator.emit("me")
    await settle(outbox, "hook", State.DEAD, 1)

    [row] = await outbox.rows()
    assert row["last_status"] == 503
    assert "max_age" in row["last_error"]
    assert row["attempts"] == len(receiver.requests) >= 3
    # Attempts stop within max_age of receipt.
    assert receiver.requests[-1].at - receiver.requests[0].at < 1.5


@pytest.mark.sqlite_only  # another process's write lock
async def test_a_store_that_cannot_hand_out_rows_delays_delivery_without_ending_it(
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relayd.store.sqlite, "LOCK_WAIT_MS", 100)  # give up on a held lock quickly
    receiver.set_default("hook", ScriptedResponse(503))
    relay = await start_relay()
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me", 3)
    await wait_until(lambda: len(receiver.requests) >= 3, what="a first failed attempt of each")

    # Another process holds the store's write lock longer than relayd waits for it: the retries
    # coming due cannot be claimed.
    other = sqlite3.connect(outbox.path, isolation_level=None)
    try:
        with capture_logs() as logged:
            other.execute("BEGIN IMMEDIATE")
            receiver.set_default("hook", ScriptedResponse(200))
            await wait_until(
                lambda: any(e["event"] == "cannot read the outbox, retrying" for e in logged),
                what="the failed claim logged",
            )
            other.execute("COMMIT")
    finally:
        other.close()

    await wait_until(lambda: len(delivered(receiver)) == 3, what="every notification delivered")
    assert not relay.task.done()  # the daemon kept running throughout


# -- what an answer means -----------------------------------------------------------------------


async def test_a_4xx_is_a_dead_letter_at_once_and_relayd_outbox_replay_sends_it_again(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.script(
        "hook", [ScriptedResponse(400, body="bad payload"), ScriptedResponse(410, body="gone")]
    )
    config_file, config = write_config(tmp_path, emulator, receiver)
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)

    await emulator.emit("me", 2)
    await settle(outbox, "hook", State.DEAD, 2)

    assert len(receiver.requests) == 2  # one attempt each: no retry of a 4xx
    rows = await outbox.rows(Filter(state=State.DEAD))
    assert sorted(
        (r["last_status"], r["attempts"], r["last_error"], r["last_response"]) for r in rows
    ) == [(400, 1, "HTTP 400", "bad payload"), (410, 1, "HTTP 410", "gone")]

    # The receiver is fixed (it answers 200 by default now); the operator replays, from another
    # "process", while the daemon keeps running.
    capsys.readouterr()
    assert await run_cli("outbox", "replay", "--yes", "--config", str(config_file)) == 0
    assert "2 dead notifications back in the queue" in capsys.readouterr().out

    delivered = await receiver.wait_for(2)
    await settle(outbox, "hook", State.DELIVERED, 2)
    first_tries = by_message(receiver.requests[:2])
    assert set(by_message(delivered)) == set(first_tries)
    for request in delivered:
        assert request.body == first_tries[request.headers["webhook-id"]][0].body


async def test_relayd_outbox_status_and_list_show_counts_and_the_last_error(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.script("hook", [ScriptedResponse(400, body="missing field x")])
    config_file, config = write_config(tmp_path, emulator, receiver)
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me", 3)
    await settle(outbox, "hook", State.DELIVERED, 2)
    await settle(outbox, "hook", State.DEAD, 1)
    capsys.readouterr()

    assert await run_cli("outbox", "status", "--config", str(config_file)) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[0].split()[:5] == ["webhook", "pending", "inflight", "delivered", "dead"]
    assert status[1].split() == ["hook", "0", "0", "2", "1", "-"]

    assert await run_cli("outbox", "list", "--config", str(config_file)) == 0
    listing = capsys.readouterr().out.splitlines()
    [dead] = [line for line in listing if " dead " in line]
    assert " 400 " in dead
    assert dead.endswith("HTTP 400")
    assert sum(" delivered " in line for line in listing) == 2

    args = ("outbox", "list", "--json", "--state", "dead", "--config", str(config_file))
    assert await run_cli(*args) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["webhook"], row["drive"], row["state"], row["attempts"]) == (
        "hook",
        "d1",
        "dead",
        1,
    )
    assert (row["last_status"], row["last_error"], row["last_response"]) == (
        400,
        "HTTP 400",
        "missing field x",
    )


async def test_a_redirect_is_not_followed_but_dead_lettered(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    receiver.script(
        "hook", [ScriptedResponse(302, headers={"Location": receiver.url("elsewhere")})]
    )
    relay = await start_relay()
    outbox = await relay_ready(relay, emulator)

    await emulator.emit("me")
    await settle(outbox, "hook", State.DEAD, 1)

    [row] = await outbox.rows()
    assert (row["last_status"], row["attempts"]) == (302, 1)
    assert on(receiver, "elsewhere") == []
    assert len(receiver.requests) == 1


# -- signatures ---------------------------------------------------------------------------------


async def test_during_a_secret_rotation_either_secret_verifies_every_attempt(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    new, old = new_secret(), new_secret()
    receiver.script("hook", [ScriptedResponse(503, headers={"Retry-After": "1"})])
    hook = {
        "url": receiver.url("hook"),
        "secret": [new, old],
        "retry": {"initial_delay": 0.05, "max_delay": 5},
    }
    relay = await start_relay(webhooks={"hook": hook})
    await relay_ready(relay, emulator)

    await emulator.emit("me", 3)
    await receiver.wait_for(3)

    wall = time.time() - time.monotonic()  # turns a request's arrival into Unix time
    assert len(receiver.requests) == 4
    for request in receiver.requests:
        headers = dict(request.headers)
        assert Webhook(new).verify(request.body, headers) == json.loads(request.body)
        assert Webhook(old).verify(request.body, headers) == json.loads(request.body)
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(request.body, headers)
        # Signed when sent, not when received from Graph.
        assert abs(int(headers["webhook-timestamp"]) - (request.at + wall)) < 1.5

    [failed] = [r for r in receiver.requests if r.status == 503]
    first, retry = by_message(receiver.requests)[failed.headers["webhook-id"]]
    assert retry.body == first.body
    assert int(retry.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert retry.headers["webhook-signature"] != first.headers["webhook-signature"]


async def test_secrets_can_come_from_a_secret_file(
    tmp_path: Path, emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    new, old = new_secret(), new_secret()
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(f"{new}\n{old}\n")
    hook = {"url": receiver.url("hook"), "secret_file": str(secret_file), "retry": FAST_RETRY}
    relay = await start_relay(webhooks={"hook": hook})
    await relay_ready(relay, emulator)

    await emulator.emit("me")
    [request] = await receiver.wait_for(1)

    assert Webhook(new).verify(request.body, dict(request.headers))
    assert Webhook(old).verify(request.body, dict(request.headers))


# -- isolation and order ------------------------------------------------------------------------


async def test_a_hanging_webhook_does_not_slow_another_fed_by_the_same_drive(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    n, concurrency = 20, 2
    receiver.set_default("a", ScriptedResponse(200, delay=30))
    relay = await start_relay(
        webhooks={
            "a": {
                "url": receiver.url("a"),
                "timeout": 1,
                "concurrency": concurrency,
                "retry": FAST_RETRY,
            },
            "b": {"url": receiver.url("b"), "retry": FAST_RETRY},
        },
        drives=[{"name": "d1", "account": "test", "resource": "me", "webhook": ["a", "b"]}],
        shutdown_grace=0.1,  # at the end, cut A's hanging attempts short
    )
    outbox = await relay_ready(relay, emulator)

    await emulator.emit("me", n)
    delivered = await receiver.wait_for(n, name="b")

    # All of B's before the first of A's attempts even timed out: A had only its first few.
    assert len(on(receiver, "a")) <= concurrency
    assert receiver.delivered("a") == []
    assert sorted(seqs(delivered)) == list(range(1, n + 1))

    # A's attempts end at its configured timeout, and `outbox list` says so.
    async def a_timed_out() -> bool:
        tried = [row for row in await outbox.rows(Filter(webhook="a")) if row["attempts"]]
        return bool(tried) and all(
            (row["last_status"], row["last_error"]) == (None, "timeout after 1s") for row in tried
        )

    await eventually(a_timed_out, timeout=5, what="A's first attempts to time out")
    assert await count(outbox, "b", State.DELIVERED) == n


async def test_an_ordered_webhook_gets_notifications_in_order_despite_a_failure(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    n = 10
    receiver.script("hook", [ScriptedResponse(503)])
    hook = {"url": receiver.url("hook"), "ordered": True, "retry": FAST_RETRY}
    relay = await start_relay(webhooks={"hook": hook})
    await relay_ready(relay, emulator)

    await emulator.emit("me", n)
    delivered = await receiver.wait_for(n)

    assert seqs(delivered) == list(range(1, n + 1))
    assert seqs(receiver.requests) == [1, *range(1, n + 1)]  # the head was retried first


async def test_an_ordered_webhook_waiting_to_retry_leaves_the_store_alone(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    """While the head of an ordered queue waits for its retry, the rows behind it are due but
    not claimable: the dispatcher must sleep until the retry, not spin on the store (a core
    pinned and a transaction a millisecond, for as long as the backoff lasts)."""
    receiver.script("hook", [ScriptedResponse(503, headers={"Retry-After": "1"})])
    retry = {"initial_delay": 0.05, "max_delay": 5}
    relay = await start_relay(
        webhooks={"hook": {"url": receiver.url("hook"), "ordered": True, "retry": retry}}
    )
    outbox = await relay_ready(relay, emulator)

    await emulator.emit("me", 3)

    async def head_waits() -> bool:
        return any(row["attempts"] == 1 for row in await outbox.rows(Filter(state=State.PENDING)))

    await eventually(head_waits, what="the first attempt's 503 recorded")
    commits = outbox.commits
    await receiver.wait_for(3)

    assert receiver.requests[1].at - receiver.requests[0].at >= 1.0
    assert outbox.commits - commits < 30  # a few claims and results, not a busy loop


# -- a clock that ran ahead ---------------------------------------------------------------------


async def write_rows_ahead(backend: Backend, seconds: float, *message_ids: str) -> None:
    """Rows as a relay whose clock ran `seconds` ahead wrote them: created, retry_from and
    next_attempt all that far in the future (the clock has since been corrected)."""
    ahead = time.time() + seconds
    async with backend.open() as store:
        await store.add(
            [
                NewDelivery(m, "hook", "d1", b'{"type":"drive.notification"}', ahead)
                for m in message_ids
            ]
        )


async def test_a_row_written_while_the_clock_ran_a_day_ahead_is_delivered_now(
    store_backend: Backend,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
) -> None:
    await write_rows_ahead(store_backend, 86400, "msg_ahead")
    relay = await start_relay()  # retry.max_delay 0.5 s: no backoff puts a retry a day ahead
    outbox = await relay_ready(relay, emulator)

    await wait_until(lambda: delivered(receiver) == {"msg_ahead"}, what="the row delivered")
    await settle(outbox, "hook", State.DELIVERED, 1)


async def test_rows_whose_retry_from_lies_ahead_are_still_dead_lettered_after_max_age(
    store_backend: Backend,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
) -> None:
    await write_rows_ahead(store_backend, 86400, "msg_all_ahead", "msg_due_but_ahead")
    # The second is due (a replay made it so, say) but still counts max_age from tomorrow.
    await store_backend.query(
        "UPDATE deliveries SET next_attempt = ? WHERE message_id = 'msg_due_but_ahead'",
        time.time(),
    )
    receiver.set_default("hook", ScriptedResponse(503))
    retry = {"initial_delay": 0.05, "max_delay": 0.2, "max_age": 1}
    relay = await start_relay(webhooks={"hook": {"url": receiver.url("hook"), "retry": retry}})
    outbox = await relay_ready(relay, emulator)

    await settle(outbox, "hook", State.DEAD, 2)
    rows = await outbox.rows(Filter(state=State.DEAD))
    assert all("gave up after max_age" in row["last_error"] for row in rows)
    # Attempts stopped within about max_age (1 s) of the relay's start, not of tomorrow. The
    # bound leaves room for a loaded machine (2.6 s was seen on one core shared by four test
    # processes); a day's retries would take it far past.
    assert {r.headers["webhook-id"] for r in receiver.requests} == {
        "msg_all_ahead",
        "msg_due_but_ahead",
    }
    assert receiver.requests[-1].at - receiver.requests[0].at < 10


# -- rows of a webhook the config no longer has -------------------------------------------------


def orphan_warnings(logged: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [
        (e["webhook"], e["waiting"])
        for e in logged
        if e["event"] == "notifications wait in the outbox for a webhook that is not configured"
    ]


async def test_a_reload_that_removes_a_webhook_with_rows_waiting_warns_and_keeps_them(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.set_default("gone", ScriptedResponse(503))
    both = {
        "hook": {"url": receiver.url("hook"), "retry": FAST_RETRY},
        "gone": {"url": receiver.url("gone"), "retry": FAST_RETRY},
    }
    drive = {"name": "d1", "account": "test", "resource": "me"}
    config_file, config = write_config(
        tmp_path, emulator, receiver, webhooks=both, drives=[{**drive, "webhook": ["hook", "gone"]}]
    )
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me", 3)
    await wait_until(lambda: len(on(receiver, "gone")) >= 3, what="a failed attempt of each")

    _, without = write_config(
        tmp_path,
        emulator,
        receiver,
        webhooks={"hook": both["hook"]},
        drives=[{**drive, "webhook": "hook"}],
    )
    with capture_logs() as logged:
        assert await relay.supervisor.reload(without)
    assert orphan_warnings(logged) == [("gone", 3)]
    assert await count(outbox, "gone", State.PENDING) == 3  # kept, and none left in flight

    # The operator deletes them: `purge` reaches waiting rows when asked to.
    capsys.readouterr()
    args = ("outbox", "purge", "--webhook", "gone", "--config", str(config_file))
    assert await run_cli(*args) == 0
    assert "0 finished notifications deleted" in capsys.readouterr().out
    assert await count(outbox, "gone", State.PENDING) == 3  # not without --state pending
    assert await run_cli(*args, "--state", "pending") == 0
    assert "3 waiting notifications deleted" in capsys.readouterr().out
    assert (await outbox.summary(Filter(webhook="gone"))).counts == {}
    # The other webhook's rows are untouched: its 3, and the resync of the drive's restart.
    assert await count(outbox, "hook", State.DELIVERED) == 4


async def test_at_start_rows_of_an_unknown_webhook_are_reported(
    store_backend: Backend,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
) -> None:
    async with store_backend.open() as store:
        body = b'{"type":"drive.notification"}'
        await store.add(
            [NewDelivery(f"msg_{n}", "renamed", "d1", body, time.time()) for n in (1, 2)]
        )
    with capture_logs() as logged:
        relay = await start_relay()
    assert orphan_warnings(logged) == [("renamed", 2)]
    outbox = await relay_ready(relay, emulator)
    assert await count(outbox, "renamed", State.PENDING) == 2


async def test_relayd_outbox_replay_state_pending_makes_a_long_backoff_due_now(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.script("hook", [ScriptedResponse(503, headers={"Retry-After": "3600"})])
    retry = {"initial_delay": 0.05, "max_delay": "1h"}
    config_file, config = write_config(
        tmp_path,
        emulator,
        receiver,
        webhooks={"hook": {"url": receiver.url("hook"), "retry": retry}},
    )
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me")

    async def waiting_an_hour() -> bool:
        rows = await outbox.rows(Filter(state=State.PENDING))
        return len(rows) == 1 and rows[0]["next_attempt"] > time.time() + 3000

    await eventually(waiting_an_hour, what="the 503's hour-long Retry-After recorded")
    capsys.readouterr()
    args = ("outbox", "replay", "--yes", "--config", str(config_file))
    assert await run_cli(*args) == 0
    assert "0 dead notifications back in the queue" in capsys.readouterr().out  # dead only
    assert await run_cli(*args, "--state", "pending") == 0
    assert "1 waiting notifications due now" in capsys.readouterr().out

    await receiver.wait_for(1)  # the receiver is back (200) and the row went now, not in an hour
    await settle(outbox, "hook", State.DELIVERED, 1)
    [row] = await outbox.rows()
    assert row["attempts"] == 1  # the replay restarted the count: a fresh backoff

    # Rows in flight are a dispatcher's: neither command touches them.
    for action in ("replay", "purge"):
        code = await run_cli("outbox", action, "--state", "inflight", "--config", str(config_file))
        assert code == 1
        assert "in flight" in capsys.readouterr().err


async def test_a_due_retry_is_made_while_new_notifications_keep_coming(
    emulator: GraphEmulator, receiver: WebhookReceiver, start_relay: StartRelay
) -> None:
    """Under steady traffic the dispatcher is woken by every new row and never sits idle: a
    retry that comes due meanwhile must still be claimed, not wait for a lull."""
    receiver.script("hook", [ScriptedResponse(503)])  # the first attempt fails, the rest work
    relay = await start_relay()
    await relay_ready(relay, emulator)
    await emulator.emit("me")
    # The failed attempt was made; its retry is due within 0.06 s.
    await wait_until(lambda: len(receiver.requests) == 1, what="the first attempt")

    async def steady_traffic() -> None:
        while 1 not in seqs(receiver.delivered("hook")):
            await emulator.emit("me")
            await asyncio.sleep(0.02)  # pacing the emitter, not waiting for a result

    await asyncio.wait_for(steady_traffic(), timeout=10)  # fails if the retry waits for a lull


# --------------------------------------------------------------------------- outbox commands


async def test_outbox_show_gives_the_body_the_headers_as_sent_and_every_attempt(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = new_secret()
    receiver.script(
        "hook", [ScriptedResponse(503, body="busy"), ScriptedResponse(500, body="oops")]
    )
    webhooks = {
        "hook": {
            "url": receiver.url("hook") + "?key=URLSECRET",
            "secret": secret,
            "headers": {"Authorization": "Bearer HEADERSECRET"},
            "retry": FAST_RETRY,
        }
    }
    config_file, config = write_config(tmp_path, emulator, receiver, webhooks=webhooks)
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me")
    await settle(outbox, "hook", State.DELIVERED, 1)
    [row] = await outbox.rows(Filter(state=State.DELIVERED))
    capsys.readouterr()

    assert await run_cli("outbox", "show", str(row["id"]), "--config", str(config_file)) == 0
    shown = capsys.readouterr().out
    for secret_part in (secret, "URLSECRET", "HEADERSECRET"):
        assert secret_part not in shown
    assert f"webhook-id: {row['message_id']}" in shown
    assert "Authorization: <hidden>" in shown
    assert "webhook-signature: <hidden: 1 v1 signature>" in shown
    assert '"type":"drive.notification"' in shown.replace(" ", "")  # the body as sent
    attempts = shown.split("attempts (3):\n", 1)[1].splitlines()
    outcomes = [line.split()[3:] for line in attempts if line.strip()[:1].isdigit()]
    assert [outcome[0] for outcome in outcomes] == ["503", "500", "200"]
    assert "answered: busy" in shown and "answered: oops" in shown

    assert await run_cli("outbox", "show", str(row["id"]), "--json", "-c", str(config_file)) == 0
    document = json.loads(capsys.readouterr().out)
    assert [a["status"] for a in document["attempts"]] == [503, 500, 200]
    assert document["headers"]["webhook-id"] == row["message_id"]


async def test_outbox_resend_sends_a_delivered_row_again_with_the_same_webhook_id(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_file, config = write_config(tmp_path, emulator, receiver)
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me", 2)
    await settle(outbox, "hook", State.DELIVERED, 2)
    first, second = sorted(await outbox.rows(Filter()), key=lambda r: r["id"])
    capsys.readouterr()

    args = ("outbox", "resend", str(first["id"]), "--config", str(config_file))
    assert await run_cli(*args, "--dry-run") == 0
    assert "--dry-run, nothing changed: 1 finished" in capsys.readouterr().out
    assert await run_cli(*args) == 0  # an id is a filter: no --yes needed
    assert "1 finished notifications due now to be sent again" in capsys.readouterr().out
    again = await receiver.wait_for(3)
    assert again[2].headers["webhook-id"] == first["message_id"]
    [original] = [r for r in again[:2] if r.headers["webhook-id"] == first["message_id"]]
    assert again[2].body == original.body  # the exact bytes of the first time
    assert second["message_id"] not in {r.headers["webhook-id"] for r in again[2:]}


async def purge_on_a_terminal(config_file: Path, *, answer: str) -> tuple[int, str]:
    """`relayd outbox purge` with a pseudo-terminal as its stdin, answering its question."""
    leader, follower = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relayd",
            "outbox",
            "purge",
            "--config",
            str(config_file),
            stdin=follower,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        os.write(leader, answer.encode() + b"\n")
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        os.close(leader)
        os.close(follower)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_outbox_purge_without_a_filter_needs_yes_off_a_terminal_and_dry_run_changes_nothing(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_file, config = write_config(tmp_path, emulator, receiver)
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me", 3)
    await settle(outbox, "hook", State.DELIVERED, 3)
    capsys.readouterr()
    purge = ("outbox", "purge", "--config", str(config_file))

    assert await run_cli(*purge) == 1  # stdin is not a terminal here
    assert "reaches all 3 rows of every webhook: add --yes" in capsys.readouterr().err
    assert await run_cli(*purge, "--dry-run") == 0
    assert "--dry-run, nothing changed: 3 finished notifications deleted" in (
        capsys.readouterr().out
    )
    assert await count(outbox, "hook", State.DELIVERED) == 3
    # On a terminal it asks; anything but yes changes nothing.
    answered, said = await purge_on_a_terminal(config_file, answer="n")
    assert (answered, said.count("purge all 3 notifications of every webhook? [y/N]")) == (1, 1)
    assert await count(outbox, "hook", State.DELIVERED) == 3
    assert await run_cli(*purge, "--yes") == 0
    assert "3 finished notifications deleted" in capsys.readouterr().out
    assert await count(outbox, "hook", State.DELIVERED) == 0


async def test_outbox_commands_refuse_a_name_that_is_nowhere_and_list_says_where_it_stopped(
    tmp_path: Path,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    start_relay: StartRelay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver.set_default("hook", ScriptedResponse(503))
    # One attempt each, then an hour's wait: the rows stay pending while the test looks.
    slow = {"initial_delay": "1h", "max_delay": "2h"}
    webhooks = {"hook": {"url": receiver.url("hook"), "retry": slow}}
    config_file, config = write_config(tmp_path, emulator, receiver, webhooks=webhooks)
    relay = await start_relay(config)
    outbox = await relay_ready(relay, emulator)
    await emulator.emit("me", 3)
    await wait_until(lambda: len(receiver.requests) >= 3, what="three failed attempts")

    async def recorded() -> bool:
        rows = await outbox.rows(Filter(state=State.PENDING))
        return len(rows) == 3 and all(row["attempts"] == 1 for row in rows)

    await eventually(recorded, what="three failures recorded, each due in an hour")
    capsys.readouterr()

    for flag, name in (("--webhook", "hoook"), ("--drive", "d9")):
        assert await run_cli("outbox", "list", flag, name, "--config", str(config_file)) == 1
        kind = flag.removeprefix("--")
        assert f"no {kind} {name!r} in the config or the outbox" in capsys.readouterr().err

    assert await run_cli("outbox", "list", "--limit", "2", "--config", str(config_file)) == 0
    captured = capsys.readouterr()
    rows = captured.out.splitlines()[1:]
    assert len(rows) == 2
    assert "(stopped at --limit 2; more rows match" in captured.err
    assert "next attempt" in captured.out.splitlines()[0]
    assert all(" pending " in row and row.count("Z") >= 2 for row in rows)  # created and due
