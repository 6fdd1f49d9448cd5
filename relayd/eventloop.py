"""Which event loop the daemon runs on: uvloop when it is installed, asyncio's own otherwise.

uvloop is a dependency on Linux (pyproject.toml), so a plain `pip install` there runs on it.
Elsewhere, or where its wheel cannot be installed, relayd runs on asyncio's loop and behaves
the same. `RELAYD_EVENT_LOOP=asyncio` chooses asyncio's loop even with uvloop installed, to
compare or to rule uvloop out. `RELAYD_EVENT_LOOP=uvloop` insists on uvloop, and relayd refuses
to start without it. The figures that made uvloop the default are in benchmarks/README.md.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")
ENV = "RELAYD_EVENT_LOOP"


class EventLoopError(Exception):
    """RELAYD_EVENT_LOOP names a loop that is unknown or not installed."""


def choose(setting: str | None, *, uvloop_installed: bool) -> str:
    """ "uvloop" or "asyncio" for a RELAYD_EVENT_LOOP value (None or "" meaning auto); pure."""
    wanted = (setting or "auto").strip().lower()
    if wanted not in CHOICES:
        raise EventLoopError(f"{ENV}={setting!r}: expected one of {', '.join(CHOICES)}")
    if wanted == "uvloop" and not uvloop_installed:
        raise EventLoopError(f"{ENV}=uvloop, but uvloop is not installed (pip install uvloop)")
    if wanted == "auto":
        return "uvloop" if uvloop_installed else "asyncio"
    return wanted


def _factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None  # asyncio.Runner's default
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], env: Mapping[str, str] | None = None) -> T:
    """asyncio.run(main), on the loop RELAYD_EVENT_LOOP (or its absence) chooses."""
    env = os.environ if env is None else env
    name = choose(env.get(ENV), uvloop_installed=importlib.util.find_spec("uvloop") is not None)
    with asyncio.Runner(loop_factory=_factory(name)) as runner:
        return runner.run(main)


def running() -> str:
    """The running loop's kind, for the start-up line: "uvloop" or "asyncio"."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]
