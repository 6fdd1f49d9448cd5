"""Graph's throttling is per tenant: one budget and one pause for every drive of a tenant.

SharePoint and OneDrive throttle per app per tenant, and Graph's guidance is that a 429 or 503 with
`Retry-After` pauses *all* requests to the service, not only the one that failed. So every Graph
request relayd makes (endpoint fetch, delta page, drive lookup) waits for a turn from its tenant:

* a **budget**: at most `per_minute` requests in any 60-second window. A token bucket does not
  promise that (a full bucket plus its refill lets through twice the rate in one window); a
  sliding window does. A request holds its place in the window from the moment it is granted
  until 60 s after its answer came back, so however long it travelled, no 60-second window *as
  Graph sees the arrivals* holds more than `per_minute` of them (the proof is in
  `TenantBudget`'s docstring, the test in tests/test_tenant.py);
* a **pause**: a throttled answer (a 429, or a 503 with Retry-After) stops every grant of the
  tenant until its `Retry-After` has passed (a 429 without one: THROTTLE_INITIAL doubling per
  throttled answer in a row, to THROTTLE_MAX). Requests already on their way are not called
  back; sockets stay up; other tenants are not touched;
* **fair turns**: waiting requests are served by priority (a connected socket's renewal, a
  drive's connect, then delta rounds, then the safety-net poll), and round-robin across drives
  within a priority, so a drive paging through a huge delta takes turns with the others
  instead of holding the budget.

`TenantBudget` is that logic, pure (time is passed in). `TenantGate` puts it on the event loop:
`async with gate.turn(drive, priority):` waits for a grant, and the block is the request.
`tenant_key` decides which tenant an account's requests count against.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import structlog

from relayd.config import AccountConfig

WINDOW = 60.0  # Graph's budgets are per minute
# A 429 without Retry-After: pause this long, doubling for each one in a row, up to the cap;
# the Microsoft Graph SDKs' RetryHandlerOption defaults (Delay 3 s, at most 180 s).
THROTTLE_INITIAL = 3.0
THROTTLE_MAX = 180.0
# MSAL's authorities that name no tenant: the account's tenant is only known after sign-in.
UNNAMED_TENANTS = frozenset({"common", "organizations", "consumers"})
DEFAULT_TENANT = "default"  # requests whose caller named no tenant (one budget for them all)

_log = structlog.get_logger("relayd.tenant")


class Priority(IntEnum):
    """Who goes first when a tenant's requests wait (lower first)."""

    RENEW = 0  # a connected socket's fresh endpoint: without it, a socket that is up goes down
    CONNECT = 1  # endpoint fetch, the cursor a socket needs: a drive is deaf without them
    ROUND = 2  # delta rounds after notifications, catch-ups after a connect, follow-ups
    POLL = 3  # the safety-net poll: nothing says anything changed


def tenant_key(account_name: str, account: AccountConfig) -> str:
    """Which tenant's budget and pause an account's Graph requests count against; pure.

    An explicit `throttle_tenant` wins (accounts of one tenant that do not name it otherwise
    share it this way). An MSAL account whose `tenant` names one (a tenant id or domain, not
    common/organizations/consumers) uses that. Anything else (token_command, token_file, an
    unnamed authority) is a tenant of its own, `account:<name>`: relayd cannot know that two
    such accounts are in one tenant, so it does not guess.
    """
    if account.throttle_tenant:
        return account.throttle_tenant.lower()
    if account.kind == "msal" and account.tenant.lower() not in UNNAMED_TENANTS:
        return account.tenant.lower()
    return f"account:{account_name}"


@dataclass(eq=False)  # identity: two requests of one drive are two tickets
class Ticket:
    """One request waiting for (or holding) a turn."""

    drive: str
    priority: Priority
    granted: bool = False
    finished: bool = False


class TenantBudget:
    """A tenant's sliding-window budget, pause and fair queue; pure (every `now` is passed in,
    from one monotonic clock).

    The window bound. A grant at time t is refused while `in_flight + finished_within(t - W, t]`
    has reached N, where a request is in flight from its grant until `finish` and then counts
    until W after its finish. Claim: no interval [s, s + W) holds more than N arrivals, where a
    request arrives (at Graph) at some moment between its grant and its finish. Suppose N + 1
    arrivals fell in [s, s + W), and let k be the one of them granted last, at g_k <= a_k <
    s + W. Each of the other N was granted before g_k, and arrived at a_j >= s, so it finished
    at f_j >= a_j >= s > g_k - W, or had not finished: at g_k each of them still counted, N in
    all, and k was refused. Contradiction.
    """

    def __init__(self, per_minute: int, *, window: float = WINDOW) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self.window = window
        self.requests = 0  # granted, ever
        self.throttles = 0  # throttled answers, ever
        self.paused_until = 0.0
        self._in_flight = 0
        self._finished: collections.deque[float] = collections.deque()  # finish times, in order
        # Per priority: drive -> its waiting tickets; the drive first in line is served next,
        # then goes to the back of the line if it has more.
        self._queues: list[collections.OrderedDict[str, collections.deque[Ticket]]] = [
            collections.OrderedDict() for _ in Priority
        ]
        self._waiting = 0
        self._in_a_row = 0  # throttled answers without a success between them
        self._paused_from = 0.0
        self._throttled_before = 0.0  # seconds paused in pauses that are over

    # -- the queue --------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, drive: str, priority: Priority) -> Ticket:
        ticket = Ticket(drive, priority)
        queue = self._queues[priority]
        line = queue.get(drive)
        if line is None:
            line = queue[drive] = collections.deque()
        line.append(ticket)
        self._waiting += 1
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """A waiting request gave up (its drive stopped): take it out of the line."""
        if ticket.granted:
            return
        queue = self._queues[ticket.priority]
        line = queue.get(ticket.drive)
        if line is None or ticket not in line:
            return
        line.remove(ticket)
        self._waiting -= 1
        if not line:
            del queue[ticket.drive]

    # -- grants -----------------------------------------------------------------------------------

    def used(self, now: float) -> int:
        """Places taken in the window ending now: in flight, or finished less than W ago."""
        self._forget(now)
        return self._in_flight + len(self._finished)

    def grant(self, now: float) -> Ticket | None:
        """The next request to send now, or None (paused, budget spent, or nobody waits)."""
        if not self._waiting or now < self.paused_until or self.used(now) >= self.per_minute:
            return None
        for queue in self._queues:
            if not queue:
                continue
            drive, line = next(iter(queue.items()))
            ticket = line.popleft()
            if line:
                queue.move_to_end(drive)  # its next request waits for the others' turns
            else:
                del queue[drive]
            self._waiting -= 1
            self._in_flight += 1
            self.requests += 1
            ticket.granted = True
            return ticket
        return None  # pragma: no cover - _waiting counts what the queues hold

    def finish(self, ticket: Ticket, now: float, *, sent: bool = True) -> None:
        """The request's answer is in (or it failed); `sent=False`: it never left (cancelled
        right after its grant), so it takes no place in the window. Idempotent."""
        if not ticket.granted or ticket.finished:
            return
        ticket.finished = True
        self._in_flight -= 1
        if sent:
            self._finished.append(now)
        else:
            self.requests -= 1

    def next_check(self, now: float) -> float | None:
        """When `grant` can next succeed if no request finishes meanwhile; None when nobody
        waits, or only a finish can free a place (every place is in flight)."""
        if not self._waiting:
            return None
        at = max(now, self.paused_until)
        used = self.used(now)
        if used >= self.per_minute:
            # A place frees when the (used - N + 1)-th oldest finish leaves the window; if the
            # places in flight alone fill it, only a finish can free one.
            excess = used - self.per_minute
            if excess >= len(self._finished):
                return None
            at = max(at, self._finished[excess] + self.window)
        return at

    def _forget(self, now: float) -> None:
        # The same sum as next_check's: `now - window` could round the other way.
        while self._finished and self._finished[0] + self.window <= now:
            self._finished.popleft()

    # -- throttling -------------------------------------------------------------------------------

    def throttled(self, now: float, retry_after: float | None) -> float:
        """A throttled answer: pause every grant; returns the pause's length from now.

        Retry-After is honoured as given. Without one: THROTTLE_INITIAL, doubled for each
        throttled answer in a row, up to THROTTLE_MAX. A pause is never shortened.
        """
        self.throttles += 1
        self._in_a_row += 1
        if retry_after is None:
            pause = min(THROTTLE_MAX, THROTTLE_INITIAL * 2.0 ** min(self._in_a_row - 1, 30))
        else:
            pause = max(0.0, retry_after)
        until = now + pause
        if now >= self.paused_until:  # a new pause: close the books on the last one
            self._throttled_before += max(0.0, self.paused_until - self._paused_from)
            self._paused_from = now
        self.paused_until = max(self.paused_until, until)
        return self.paused_until - now

    def succeeded(self) -> None:
        """An answer that was not throttled: the next throttle without Retry-After starts over."""
        self._in_a_row = 0

    def throttled_seconds(self, now: float) -> float:
        """Time spent paused so far (the current pause up to now)."""
        current = max(0.0, min(now, self.paused_until) - self._paused_from)
        return self._throttled_before + current


@dataclass(frozen=True)
class TenantReport:
    """What /status, `relayd status` and the metrics show for one tenant."""

    tenant: str
    budget_per_minute: int
    used_last_minute: int  # places taken in the window ending now (in flight included)
    waiting: int
    requests: int
    throttled: int  # throttled answers
    throttled_seconds: float
    throttled_until: float | None  # wall-clock time, while paused

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_per_minute": self.budget_per_minute,
            "used_last_minute": self.used_last_minute,
            "waiting": self.waiting,
            "requests": self.requests,
            "throttled": self.throttled,
            "throttled_seconds": round(self.throttled_seconds, 3),
            "throttled_until": self.throttled_until,
        }


class TenantGate:
    """A tenant's budget on the event loop: requests wait for their turn here.

    Waiters are futures resolved by `_dispatch`, which runs whenever something changes (a
    request arrives, finishes, gives up) and, while requests wait for time to pass (a pause, a
    full window), from one timer the gate owns: no task of its own. The timer is armed only
    while requests wait, so a gate left behind (a reload replaced its client) winds down as
    the requests in its line end.
    """

    def __init__(
        self,
        name: str,
        per_minute: int,
        *,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.budget = TenantBudget(per_minute, window=window)
        self._clock = clock
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None

    @contextlib.asynccontextmanager
    async def turn(self, drive: str, priority: Priority) -> AsyncIterator[None]:
        """Wait for a grant; the block is the request (its end is the answer)."""
        ticket = self.budget.submit(drive, priority)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        self._dispatch()
        try:
            await future
        except BaseException:
            self._waiters.pop(ticket, None)
            self.budget.withdraw(ticket)
            self.budget.finish(ticket, self._clock(), sent=False)  # granted as it was cancelled
            self._dispatch()
            raise
        try:
            yield
        finally:
            self.budget.finish(ticket, self._clock())
            self._dispatch()

    def throttled(self, retry_after: float | None, *, drive: str, status: int) -> float:
        """A throttled answer to one of this tenant's requests: pause them all."""
        now = self._clock()
        was_paused = now < self.budget.paused_until
        pause = self.budget.throttled(now, retry_after)
        if not was_paused:
            _log.warning(
                "Graph throttled this tenant; pausing all its Graph requests",
                tenant=self.name,
                status=status,
                drive=drive,
                retry_after=retry_after,
                pause=round(pause, 1),
                waiting=self.budget.waiting,
            )
        self._dispatch()  # re-arms the timer for the end of the pause
        return pause

    def succeeded(self) -> None:
        self.budget.succeeded()

    def report(self) -> TenantReport:
        now = self._clock()
        budget = self.budget
        paused = budget.paused_until > now
        return TenantReport(
            tenant=self.name,
            budget_per_minute=budget.per_minute,
            used_last_minute=budget.used(now),
            waiting=budget.waiting,
            requests=budget.requests,
            throttled=budget.throttles,
            throttled_seconds=budget.throttled_seconds(now),
            throttled_until=time.time() + (budget.paused_until - now) if paused else None,
        )

    def _dispatch(self) -> None:
        now = self._clock()
        while (ticket := self.budget.grant(now)) is not None:
            future = self._waiters.pop(ticket)
            if future.done():  # cancelled, its task not yet resumed: the place goes back
                self.budget.finish(ticket, now, sent=False)
                continue
            future.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        wake = self.budget.next_check(now)
        if wake is not None:
            # A little after, not on the dot: a timer that fires early would find nothing due
            # and arm itself again for the same moment.
            delay = max(0.0, wake - now) + 0.001
            self._timer = asyncio.get_running_loop().call_later(delay, self._dispatch)
