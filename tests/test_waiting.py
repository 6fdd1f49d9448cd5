"""relayd.waiting: a deadline on a wait never costs the cancellation that stops the daemon.

The race these tests set up is the one that hung `GraphEmulator.stop()` in a CI run, and that a
dispatcher woken by a new row as the daemon stops would meet: the task is cancelled in the same
loop iteration as the thing it waits for completes. `asyncio.wait_for` on Python 3.11 then returns
the result and the cancellation is gone (CPython gh-86296), so the loop around it runs on.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from relayd.waiting import wait_event, within


async def _stopped_within(task: asyncio.Task[None], seconds: float) -> bool:
    await asyncio.wait([task], timeout=seconds)
    if not task.done():
        task.cancel()  # the old behaviour: don't leave it running past the test
        await asyncio.wait([task], timeout=seconds)
        return False
    return task.cancelled()


@pytest.mark.timeout(10)
async def test_a_loop_cancelled_as_its_event_is_set_stops() -> None:
    wake, parked = asyncio.Event(), asyncio.Event()
    rounds = 0

    async def dispatcher_like() -> None:
        nonlocal rounds
        while True:
            parked.set()
            await wait_event(wake, 30)
            wake.clear()
            rounds += 1

    task = asyncio.create_task(dispatcher_like())
    await parked.wait()  # the task is now inside wait_event
    wake.set()
    task.cancel()
    assert await _stopped_within(task, 3), "the cancellation was lost: the loop ran on"
    assert rounds == 0


@pytest.mark.timeout(10)
async def test_a_shielded_wait_cancelled_as_its_future_completes_is_cancelled() -> None:
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    parked = asyncio.Event()
    went_on = False

    async def fetch_like() -> None:
        nonlocal went_on
        parked.set()
        await within(asyncio.shield(exited), 30)
        went_on = True  # a token fetch would have gone on to read the output
        await asyncio.Event().wait()

    task = asyncio.create_task(fetch_like())
    await parked.wait()
    exited.set_result(0)
    task.cancel()
    assert await _stopped_within(task, 3)
    assert not went_on


@pytest.mark.timeout(10)
async def test_wait_event_says_whether_the_event_came_or_the_time_ran_out() -> None:
    event = asyncio.Event()
    started = time.monotonic()
    assert await wait_event(event, 0.05) is False
    assert time.monotonic() - started >= 0.05
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_event(event, 5) is True
    assert await wait_event(event, 0) is True  # already set: no wait at all


@pytest.mark.timeout(10)
async def test_within_gives_the_result_or_a_timeout_and_cancels_what_ran_out() -> None:
    assert await within(asyncio.sleep(0, result="done"), 5) == "done"
    slow = asyncio.create_task(asyncio.Event().wait())
    with pytest.raises(TimeoutError):
        await within(slow, 0.05)
    assert slow.cancelled()
