"""Waiting for something with a deadline, without losing a cancellation.

`asyncio.wait_for` is not used anywhere in relayd: on Python 3.11 a task cancelled in the same
loop iteration as the awaited thing completes gets the result instead of the cancellation, which
is then lost (CPython gh-86296; 3.12 rewrote `wait_for` on `asyncio.timeout`). A dispatcher woken
by a new row as the daemon stops, or the emulator's expiry loop woken by a new subscription as it
stops, then ran on and the stop never ended. `asyncio.timeout` keeps the cancellation on 3.11 too;
ruff's banned-api rule (TID251, pyproject.toml) keeps `wait_for` out of the package.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["wait_event", "within"]

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Until `event` is set or `timeout` seconds pass (None: no limit); whether it is set."""
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`awaitable`'s result, or TimeoutError once `timeout` seconds pass (it is then cancelled).

    To wait for a future that must outlive the timeout, pass `asyncio.shield(future)`.
    """
    async with asyncio.timeout(timeout):
        return await awaitable
