"""Waiting on a condition with a deadline: the only way tests synchronise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_until(
    condition: Callable[[], object], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `condition` every 10 ms until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def eventually(
    check: Callable[[], Awaitable[object]], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Like `wait_until`, for a condition that has to await (the outbox answers asynchronously)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


async def stays_true(condition: Callable[[], object], *, seconds: float, what: str) -> None:
    """Check `condition` every 10 ms for `seconds`; fail the moment it is false."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            raise AssertionError(f"{what} stopped holding")
        await asyncio.sleep(0.01)
