"""The group-commit queue both stores' writers read: what shares a commit, and when it starts."""

from __future__ import annotations

import asyncio

from relayd.store.batching import DEFER_MAX, CommitQueue


async def test_what_queues_while_a_commit_runs_goes_into_the_next_one_together() -> None:
    commits: CommitQueue[str] = CommitQueue()
    commits.put("first")
    assert await commits.next_batch() == ["first"]
    # The writer is committing "first": these three arrive meanwhile and share one commit.
    for item in ("a", "b", "c"):
        commits.put(item)
    assert await commits.next_batch() == ["a", "b", "c"]


async def test_a_deferrable_operation_waits_for_company_but_not_for_ever() -> None:
    commits: CommitQueue[int] = CommitQueue()
    commits.put(1, deferrable=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(commits.next_batch(), 5) == [1]  # the short timer fired
    assert loop.time() - started < 1
    for item in range(DEFER_MAX):  # enough of them start the commit without the timer
        commits.put(item, deferrable=True)
    assert await asyncio.wait_for(commits.next_batch(), 5) == list(range(DEFER_MAX))


async def test_closing_drains_what_is_queued_then_ends_the_writer() -> None:
    commits: CommitQueue[str] = CommitQueue()
    commits.put("late", deferrable=True)
    commits.close()
    assert await commits.next_batch() == ["late"]
    assert await commits.next_batch() is None
