"""The store's behaviour that callers rely on, on both backends (SQLite and PostgreSQL).

Each test runs twice through `store_backend` (tests/support/stores.py); what it reads "on disk"
it reads with a connection of its own, as another process would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from store_rows import T0, Clock, new, result
from support.stores import Backend

from relayd.store import AttemptResult, Filter, NewDelivery, OutboxError, State, Store


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def outbox(store_backend: Backend, clock: Clock) -> AsyncIterator[Store]:
    async with store_backend.open(clock=clock) as store:
        yield store


async def test_added_rows_are_on_disk_when_add_returns(
    outbox: Store, store_backend: Backend
) -> None:
    await outbox.add([new(1), new(2, webhook="other")])

    rows = await store_backend.query(
        "SELECT message_id, webhook, drive, body, state, attempts FROM deliveries ORDER BY id",
    )
    assert rows == [
        ("msg_hook_d1_1", "hook", "d1", new(1).body, "pending", 0),
        ("msg_other_d1_2", "other", "d1", new(2).body, "pending", 0),
    ]


async def test_concurrent_adds_share_commits(outbox: Store, store_backend: Backend) -> None:
    await outbox.add([new(0)])
    before = outbox.commits
    await outbox.add([new(1)])
    assert outbox.commits == before + 1  # the counter counts transactions

    before = outbox.commits
    await asyncio.gather(*(outbox.add([new(n)]) for n in range(2, 1002)))

    assert await store_backend.query("SELECT COUNT(*) FROM deliveries") == [(1002,)]
    # 1000 callers, each told "on disk", from a handful of fsyncs rather than 1000.
    assert outbox.commits - before <= 10


async def test_a_failing_add_does_not_undo_the_others_committed_with_it(
    outbox: Store, store_backend: Backend
) -> None:
    broken = NewDelivery(message_id="bad", webhook=None, drive="d1", body=b"{}", created=T0)  # type: ignore[arg-type]
    before = outbox.commits
    outcomes = await asyncio.gather(
        outbox.add([new(1)]), outbox.add([broken]), outbox.add([new(2)]), return_exceptions=True
    )

    assert outbox.commits == before + 1  # one transaction for the three

    assert outcomes[0] is None
    # Callers only ever see OutboxError; it names the store and what the database said.
    assert isinstance(outcomes[1], OutboxError)
    assert outbox.describe() in str(outcomes[1])
    assert any(
        said in str(outcomes[1])
        for said in ("NOT NULL constraint failed", "violates not-null constraint")
    )
    assert outcomes[2] is None
    assert await store_backend.query("SELECT message_id FROM deliveries ORDER BY id") == [
        ("msg_hook_d1_1",),
        ("msg_hook_d1_2",),
    ]


async def test_a_closed_store_refuses_work_and_closing_twice_is_harmless(
    store_backend: Backend,
) -> None:
    store = store_backend.open()
    async with store:
        pass
    await store.close()
    with pytest.raises(OutboxError, match="closed"):
        await store.add([new(1)])


async def test_claim_marks_rows_in_flight_and_never_hands_a_row_out_twice(
    outbox: Store, store_backend: Backend
) -> None:
    await outbox.add([new(n) for n in range(20)] + [new(99, webhook="other")])

    claims = await asyncio.gather(*(outbox.claim("hook", 3) for _ in range(10)))

    ids = [row.id for claim in claims for row in claim]
    assert all(len(claim) <= 3 for claim in claims)
    assert len(ids) == len(set(ids)) == 20  # every row once; none of the other webhook's
    assert {row.webhook for claim in claims for row in claim} == {"hook"}
    assert await store_backend.query(
        "SELECT webhook, state, COUNT(*) FROM deliveries GROUP BY 1, 2 ORDER BY 1, 2"
    ) == [
        ("hook", "inflight", 20),
        ("other", "pending", 1),
    ]
    assert await outbox.claim("hook", 5) == []

    [row] = [row for claim in claims for row in claim if row.message_id == "msg_hook_d1_7"]
    assert row.body == new(7).body  # the stored bytes, exactly
    assert (row.drive, row.created, row.retry_from, row.attempts) == ("d1", T0, T0, 0)


async def test_claim_reads_the_store_in_batches_of_at_most_limit(
    outbox: Store, clock: Clock
) -> None:
    await outbox.add([new(n, created=T0 - 10_000 + n) for n in range(10_000)])

    first = await outbox.claim("hook", 50)
    second = await outbox.claim("hook", 50)

    assert len(first) == len(second) == 50
    # Oldest first.
    assert [row.created for row in first + second] == [T0 - 10_000 + n for n in range(100)]
    assert (await outbox.summary()).backlog("hook") == 10_000


async def test_ordered_claim_gives_only_the_oldest_and_nothing_while_it_is_in_flight(
    outbox: Store, clock: Clock
) -> None:
    await outbox.add([new(n) for n in range(3)])

    [head] = await outbox.claim("hook", 10, ordered=True)
    assert head.message_id == "msg_hook_d1_0"
    assert await outbox.claim("hook", 10, ordered=True) == []

    # A failed head stays at the head: the rows behind it wait even though they are due.
    await outbox.record([result(head, State.PENDING, next_attempt=T0 + 30, status=503)])
    assert await outbox.claim("hook", 10, ordered=True) == []
    clock.now = T0 + 30
    [again] = await outbox.claim("hook", 10, ordered=True)
    assert again.id == head.id
    assert again.attempts == 1

    await outbox.record([result(again, State.DELIVERED, status=200)])
    [second] = await outbox.claim("hook", 10, ordered=True)
    assert second.message_id == "msg_hook_d1_1"


async def test_next_due_of_an_ordered_queue_is_when_its_head_can_go(
    outbox: Store, clock: Clock
) -> None:
    """A dispatcher sleeps until next_due: for an ordered webhook that must be the head's retry
    time, not that of the rows queued behind it (due long ago, but not claimable)."""
    await outbox.add([new(n) for n in range(3)])
    [head] = await outbox.claim("hook", 1, ordered=True)

    assert await outbox.next_due("hook", ordered=True) is None  # wait for the head's outcome
    assert await outbox.next_due("hook") == T0

    await outbox.record([result(head, State.PENDING, next_attempt=T0 + 30, status=503)])
    assert await outbox.next_due("hook", ordered=True) == T0 + 30
    assert await outbox.next_due("hook") == T0
    assert await outbox.next_due("nobody", ordered=True) is None


async def test_attempt_results_arriving_one_by_one_share_commits(outbox: Store) -> None:
    await outbox.add([new(n) for n in range(10)])
    claimed = await outbox.claim("hook", 10)
    before = outbox.commits

    recorded = []
    for row in claimed:  # each answer in its own turn of the loop, as POST answers come back
        recorded.append(asyncio.create_task(outbox.record([result(row, State.DELIVERED)])))
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*recorded), 5)

    assert outbox.commits - before <= 2
    assert (await outbox.summary()).counts == {("hook", State.DELIVERED): 10}


async def test_a_claim_commits_the_results_waiting_before_it(outbox: Store) -> None:
    await outbox.add([new(1), new(2)])
    [head] = await outbox.claim("hook", 10, ordered=True)
    # Tasks start in the order they were created: the result is queued first, waiting for
    # company, and the ordered queue's next claim sees the head delivered, in the same commit.
    recorded = asyncio.create_task(outbox.record([result(head, State.DELIVERED)]))
    [second] = await asyncio.create_task(outbox.claim("hook", 10, ordered=True))
    assert recorded.done()
    assert second.message_id == "msg_hook_d1_2"


async def test_record_moves_rows_to_delivered_dead_or_back_to_pending_when_due(
    outbox: Store, store_backend: Backend, clock: Clock
) -> None:
    await outbox.add([new(n) for n in range(3)])
    delivered, dead, retry = await outbox.claim("hook", 3)

    await outbox.record(
        [
            result(delivered, State.DELIVERED, status=204, latency=0.01),
            result(dead, State.DEAD, status=410, error="HTTP 410", response="gone"),
            result(retry, State.PENDING, next_attempt=T0 + 60, status=503, error="HTTP 503"),
        ]
    )

    rows = await store_backend.query(
        "SELECT state, attempts, next_attempt, last_status, last_error, last_response, finished"
        " FROM deliveries ORDER BY id",
    )
    assert rows == [
        ("delivered", 1, T0, 204, None, None, T0),
        ("dead", 1, T0, 410, "HTTP 410", "gone", T0),
        ("pending", 1, T0 + 60, 503, "HTTP 503", None, None),
    ]
    assert await outbox.claim("hook", 10) == []  # not due yet
    assert await outbox.next_due("hook") == T0 + 60
    clock.now = T0 + 59.9
    assert await outbox.claim("hook", 10) == []
    clock.now = T0 + 60
    [back] = await outbox.claim("hook", 10)
    assert (back.id, back.attempts) == (retry.id, 1)


async def test_rows_left_in_flight_by_a_crashed_run_come_back_on_the_next_start(
    store_backend: Backend, clock: Clock
) -> None:
    async with store_backend.open(clock=clock) as first:
        await first.add([new(n) for n in range(3)])
        claimed = await first.claim("hook", 2)
        # The run ends without an outcome for its two attempts (killed mid-POST).
    assert len(claimed) == 2

    async with store_backend.open(clock=clock) as second:
        summary = await second.summary()
        assert summary.counts == {("hook", State.PENDING): 3}
        assert {row.id for row in await second.claim("hook", 10)} == {1, 2, 3}


async def test_a_cli_opening_the_store_beside_the_daemon_leaves_its_rows_in_flight(
    store_backend: Backend, clock: Clock
) -> None:
    async with store_backend.open(clock=clock) as daemon:
        await daemon.add([new(n) for n in range(3)])
        await daemon.claim("hook", 2)

        async with store_backend.open(recover=False, clock=clock) as cli:
            assert (await cli.summary()).counts == {
                ("hook", State.INFLIGHT): 2,
                ("hook", State.PENDING): 1,
            }
        # The daemon's attempts are still its own: nobody else can claim those rows.
        [row] = await daemon.claim("hook", 10)
        assert row.id == 3


async def dead_letters(outbox: Store, rows: list[NewDelivery]) -> None:
    await outbox.add(rows)
    for webhook in {row.webhook for row in rows}:
        claimed = await outbox.claim(webhook, len(rows))
        await outbox.record(
            result(row, State.DEAD, status=400, error="HTTP 400") for row in claimed
        )


async def test_replay_puts_the_selected_dead_rows_back_in_the_queue(
    outbox: Store, clock: Clock
) -> None:
    hour = 3600.0
    await dead_letters(
        outbox,
        [
            new(1, webhook="a", drive="d1", created=T0 - 3 * hour),
            new(2, webhook="a", drive="d1", created=T0 - 2 * hour),
            new(3, webhook="a", drive="d2", created=T0 - 2 * hour),
            new(4, webhook="b", drive="d1", created=T0 - 1 * hour),
        ],
    )
    # Pending, and not due before T0 + 100: replay must leave it alone.
    await outbox.add([new(5, webhook="a", created=T0 + 100)])
    clock.now = T0 + 10

    assert await outbox.replay(Filter(webhook="nobody")) == 0
    window = Filter(webhook="a", drive="d1", since=T0 - 2.5 * hour, until=T0 - 1.5 * hour)
    assert await outbox.replay(window) == 1

    [replayed] = await outbox.claim("a", 10)
    assert replayed.message_id == "msg_a_d1_2"
    # A fresh max_age: it counts from the replay, not from when the notification came in.
    assert replayed.retry_from == T0 + 10

    assert await outbox.replay(Filter(drive="d1")) == 2  # rows 1 and 4
    assert await outbox.replay(Filter()) == 1  # row 3; nothing else is dead
    assert await outbox.replay(Filter()) == 0
    assert {row.message_id for row in await outbox.claim("a", 10)} == {"msg_a_d1_1", "msg_a_d2_3"}
    assert {row.message_id for row in await outbox.claim("b", 10)} == {"msg_b_d1_4"}
    assert (await outbox.summary()).counts == {
        ("a", State.INFLIGHT): 3,
        ("a", State.PENDING): 1,
        ("b", State.INFLIGHT): 1,
    }


async def test_purge_deletes_only_finished_rows(outbox: Store) -> None:
    await dead_letters(outbox, [new(1), new(2, webhook="other")])
    await outbox.add([new(n) for n in range(3, 6)])
    delivered, in_flight = await outbox.claim("hook", 2)
    await outbox.record([result(delivered, State.DELIVERED, status=200)])

    assert await outbox.purge(Filter(webhook="hook")) == 2  # one dead, one delivered

    summary = await outbox.summary()
    assert summary.counts == {
        ("hook", State.INFLIGHT): 1,
        ("hook", State.PENDING): 1,
        ("other", State.DEAD): 1,
    }
    assert await outbox.purge(Filter()) == 1
    assert in_flight.id in {row["id"] for row in await outbox.rows()}


async def test_prune_forgets_delivered_rows_finished_before_the_cutoff(
    outbox: Store, store_backend: Backend
) -> None:
    await outbox.add([new(n) for n in range(4)])
    old, recent, dead, waiting = await outbox.claim("hook", 4)
    await outbox.record(
        [
            AttemptResult(id=old.id, state=State.DELIVERED, attempted_at=T0 - 100, status=200),
            AttemptResult(id=recent.id, state=State.DELIVERED, attempted_at=T0, status=200),
            AttemptResult(id=dead.id, state=State.DEAD, attempted_at=T0 - 100, status=400),
        ]
    )

    assert await outbox.prune(T0 - 50) == 1

    assert await store_backend.query("SELECT id FROM deliveries ORDER BY id") == [
        (recent.id,),
        (dead.id,),
        (waiting.id,),
    ]


async def test_summary_counts_per_webhook_and_state_with_the_oldest_waiting(
    outbox: Store,
) -> None:
    await dead_letters(outbox, [new(1, webhook="a", created=T0 - 500)])
    await outbox.add(
        [
            new(2, webhook="a", created=T0 - 300),
            new(3, webhook="a", created=T0 - 200),
            new(4, webhook="a", created=T0 - 100),
            new(5, webhook="b", drive="d2", created=T0 - 50),
        ]
    )
    claimed = await outbox.claim("a", 1)
    [delivered] = await outbox.claim("a", 1)
    await outbox.record([result(delivered, State.DELIVERED, status=200)])

    summary = await outbox.summary()
    assert summary.counts == {
        ("a", State.DEAD): 1,
        ("a", State.INFLIGHT): 1,
        ("a", State.DELIVERED): 1,
        ("a", State.PENDING): 1,
        ("b", State.PENDING): 1,
    }
    assert claimed[0].created == T0 - 300  # in flight still counts as waiting
    assert summary.oldest_pending == {"a": T0 - 300, "b": T0 - 50}
    assert summary.backlog("a") == 2
    assert summary.backlog("nobody") == 0

    only_d2 = await outbox.summary(Filter(drive="d2"))
    assert only_d2.counts == {("b", State.PENDING): 1}
    rows = await outbox.rows(Filter(webhook="a", state=State.DEAD))
    assert [(row["message_id"], row["last_status"], row["last_error"]) for row in rows] == [
        ("msg_a_d1_1", 400, "HTTP 400")
    ]


async def test_a_drive_id_belongs_to_its_resource_and_a_cursor_to_its_drive_id(
    outbox: Store, store_backend: Backend
) -> None:
    await outbox.save_drive_id("d1", "me", "b!one")
    await outbox.save_drive_state("d1", "me", "https://graph/drives/b!one/root/delta?token=1")
    # Same resource: both kept, across a reopen.
    assert await outbox.drive_id("d1") == ("me", "b!one")
    async with store_backend.open(recover=False) as again:
        assert await again.drive_id("d1") == ("me", "b!one")
        assert await again.drive_state("d1") == (
            "me",
            "https://graph/drives/b!one/root/delta?token=1",
        )
    # A new resource resolved: the old drive's cursor goes with its id.
    await outbox.save_drive_id("d1", "groups/g", "b!two")
    assert await outbox.drive_state("d1") == ("groups/g", None)
    # A new resource saved by its cursor first: the old id is not the new resource's.
    await outbox.save_drive_state("d1", "sites/s", None)
    assert await outbox.drive_id("d1") is None
    assert await outbox.drive_id("never-seen") is None
