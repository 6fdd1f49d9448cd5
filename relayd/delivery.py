"""Delivery from the outbox to one webhook: a dispatcher per webhook, retries, dead letters.

The pure half decides what an answer means (`judge`) and when to try again (`retry_delay`); the
`Dispatcher` claims due rows from the outbox, POSTs them with Standard Webhooks signatures, and
records each outcome. One dispatcher per webhook, so a slow or dead receiver only ever holds back
its own queue.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import structlog

from relayd import __version__
from relayd.config import RetryConfig, WebhookConfig
from relayd.graph import parse_retry_after
from relayd.network import describe_connection_error
from relayd.outage import Outage, Report, log_report
from relayd.signing import decode_secret, signature_headers
from relayd.store import AttemptResult, Delivery, OutboxError, State, Store
from relayd.waiting import wait_event

log = structlog.get_logger("relayd.delivery")

USER_AGENT = f"relayd/{__version__}"
RESPONSE_KEEP = 1024  # bytes of a receiver's answer kept with the attempt, for `outbox list`
JITTER = 0.2  # +-20 %, so retries after a shared outage do not arrive in lockstep
# While idle, look at the store this often anyway: `relayd outbox replay` run from another process
# puts rows back without telling us.
IDLE_POLL = 2.0
RECORD_RETRY = 1.0
# How long a stopping dispatcher waits for the commits it reserved rows in to end, so that those
# rows go back to the queue with the rest of what it holds. A commit takes milliseconds; one that
# waits for a CLI command's lock can take seconds, and its rows are then refused and put back by
# the outbox itself (see `Reservation.hand_over`). Well within the supervisor's stop deadline.
RESERVATION_WAIT = 2.0

Verdict = Literal["delivered", "retry", "dead"]


def judge(status: int | None) -> Verdict:
    """What an attempt's outcome means. `None` is a network error or a timeout.

    Only 2xx delivers. Redirects are not followed (a receiver that moved must be reconfigured, not
    guessed at). 408, 429 and 5xx are worth retrying; other 4xx, 410 included, will not get better
    by asking again.
    """
    if status is None:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or status >= 500:
        return "retry"
    return "dead"


def retry_delay(
    attempts: int,
    policy: RetryConfig,
    *,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds until the next attempt, after `attempts` failed ones (1 or more).

    Exponential from `initial_delay`, capped at `max_delay`, with +-20 % jitter. A receiver's
    Retry-After wins when it asks for longer, and is itself capped at `max_delay`.
    """
    base: float = policy.initial_delay * 2.0 ** min(max(attempts - 1, 0), 62)
    delay = min(base, policy.max_delay) * (1 - JITTER + 2 * JITTER * rand())
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, policy.max_delay)


@dataclass(frozen=True)
class Attempt:
    """What happened on the wire for one POST."""

    status: int | None
    error: str | None
    latency: float
    response: str | None
    retry_after: float | None


def conclude(row: Delivery, attempt: Attempt, policy: RetryConfig, now: float) -> AttemptResult:
    """Turn one attempt into the row's next state; pure.

    A `retry_from` in the future (written while the clock ran ahead) counts as now: otherwise
    max_age would not begin until the clock caught up, and the row would retry that long.
    """
    verdict = judge(attempt.status)
    next_attempt: float | None = None
    state = State.DELIVERED
    error = attempt.error
    if verdict == "retry":
        next_attempt = now + retry_delay(row.attempts + 1, policy, retry_after=attempt.retry_after)
        if next_attempt - min(row.retry_from, now) > policy.max_age:
            state, next_attempt = State.DEAD, None
            error = f"{error or f'HTTP {attempt.status}'}; gave up after max_age"
        else:
            state = State.PENDING
    elif verdict == "dead":
        state = State.DEAD
    return AttemptResult(
        id=row.id,
        state=state,
        attempted_at=now,
        next_attempt=next_attempt,
        status=attempt.status,
        error=error,
        latency=attempt.latency,
        response=attempt.response,
    )


class Reservation:
    """Room one dispatcher set aside for rows of a commit under way: handed to that dispatcher
    and no other, so a reload that replaces it cannot send them to one that never runs them."""

    __slots__ = ("_dispatcher", "_open", "count")

    def __init__(self, dispatcher: Dispatcher, count: int) -> None:
        self._dispatcher = dispatcher
        self._open = True
        self.count = count

    def hand_over(self, rows: list[Delivery]) -> bool:
        """The reserved rows, committed and in flight ([] if the commit failed). False: the
        dispatcher has stopped and took none; the outbox puts them back in the queue."""
        if not self._open:
            raise RuntimeError("a reservation is handed over once")
        self._open = False
        return self._dispatcher._take(self.count, rows)


class Dispatcher:
    """Delivers one webhook's queue until stopped."""

    def __init__(
        self,
        name: str,
        config: WebhookConfig,
        outbox: Store,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        on_result: Callable[[str, AttemptResult], None] | None = None,
        request_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`request_options`: extra aiohttp arguments for every delivery (the proxy to use)."""
        self.name = name
        self._request_options = dict(request_options or {})
        self._on_result = on_result
        self.config = config
        self._outbox = outbox
        self._session = session
        self._clock = clock
        self._keys = tuple(decode_secret(secret) for secret in config.secret)
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._limit = 1 if config.ordered else config.concurrency
        # Rows held in memory beyond those being attempted: claimed in batches (and handed over
        # at commit) so a busy webhook does not read the store once per notification. Bounded,
        # so a backlog of any size stays on disk.
        self._capacity = 1 if config.ordered else 2 * config.concurrency
        self._ready: collections.deque[Delivery] = collections.deque()
        self._reserved = 0  # rows of reservations not yet handed over
        self._settled = asyncio.Event()  # set while no reservation is outstanding
        self._settled.set()
        self._accepting = True  # False once draining: a hand-over is then refused
        self._store_has_due = True  # the store may hold due rows that we have not claimed
        self._wakes = 0  # wake() calls so far: one during a claim means look again
        self._next_due: float | None = None  # earliest known retry waiting in the store
        self._looked_at = 0.0  # when the store was last asked for due rows (the clock's time)
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[asyncio.Task[None], int] = {}  # task -> row id
        # Rows whose POST is under way: what `concurrency` limits. An attempt's result is
        # recorded after its slot is free, so the store's commit is not part of the cycle.
        self._posting: set[int] = set()
        self._log = log.bind(webhook=name)
        # Attempts are logged one by one at debug level only; the outage is what is logged.
        self.outage = Outage()
        self.last_status: int | None = None  # of the last failed attempt, for `relayd status`

    @property
    def next_retry_due(self) -> float | None:
        """When the earliest retry this dispatcher knows of is due (the clock's time)."""
        return self._next_due

    def wake(self) -> None:
        """New rows for this webhook are waiting in the store."""
        self._store_has_due = True
        self._wakes += 1
        self._wake.set()

    def reserve(self, count: int) -> Reservation | None:
        """Take up to `count` rows straight from their commit, or None (ordered webhooks never
        do: their order is the store's; a stopping dispatcher takes nothing new)."""
        if self.config.ordered or self._stopping:
            return None
        room = self._capacity - len(self._posting) - len(self._ready) - self._reserved
        taken = min(count, room)
        if taken <= 0:
            return None
        self._reserved += taken
        self._settled.clear()
        return Reservation(self, taken)

    def _take(self, reserved: int, rows: list[Delivery]) -> bool:
        self._reserved -= reserved
        if self._reserved <= 0:
            self._reserved = 0
            self._settled.set()
        if not rows:
            return True
        if not self._accepting:
            return False
        # Stopping but not yet drained: the drain puts these back in the queue with the rest.
        self._ready.extend(rows)
        self._wake.set()
        return True

    def stop(self) -> None:
        """Take no new rows; `run` returns once the attempts under way end or are cancelled."""
        self._stopping = True
        self._wake.set()

    async def run(self, *, grace: float = 5.0) -> None:
        """Deliver until `stop()`; then give attempts under way `grace` seconds to finish."""
        try:
            while not self._stopping:
                try:
                    await self._fill()
                except OutboxError as exc:
                    # The store could not hand out rows (a disk error, a lock held too long).
                    # They stay where they are and the next look may well succeed: delivery to
                    # this webhook waits, it does not end (which would end the daemon).
                    self._log.error("cannot read the outbox, retrying", error=str(exc))
                    self._store_has_due = True
                    await asyncio.sleep(RECORD_RETRY)
                    continue
                if self._stopping:
                    break
                await self._idle()
        finally:
            self._stopping = True  # also when cancelled: reserve nothing more
            try:
                # Rows reserved in commits under way are ours: once those end, they are in
                # `_ready` and the drain puts them back with the rest.
                await wait_event(self._settled, RESERVATION_WAIT)
            finally:
                self._accepting = False
            await self._drain(grace)

    async def _fill(self) -> None:
        room = self._capacity - len(self._posting) - len(self._ready) - self._reserved
        # Claim in batches: only once the local buffer is down to what the free slots need.
        if self._store_has_due and room > 0 and len(self._ready) < self._limit:
            self._looked_at = self._clock()
            wakes = self._wakes
            rows = await self._outbox.claim(self.name, room, ordered=self.config.ordered)
            self._ready.extend(rows)
            if len(rows) < room and not (self.config.ordered and rows):
                # All that was due is claimed; what remains waits for a retry time, unless rows
                # were added while the claim ran.
                self._store_has_due = self._wakes != wakes
                self._next_due = await self._outbox.next_due(
                    self.name, ordered=self.config.ordered, horizon=self.config.retry.max_delay
                )
        while self._ready and len(self._posting) < self._limit and not self._stopping:
            row = self._ready.popleft()
            task = asyncio.create_task(self._deliver(row), name=f"relayd-deliver-{row.id}")
            self._in_flight[task] = row.id
            self._posting.add(row.id)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._posting.discard(self._in_flight.pop(task, -1))
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            # _deliver records every outcome itself; reaching here means the store failed.
            self._log.error("delivery bookkeeping failed", error=str(task.exception()))

    async def _idle(self) -> None:
        """Sleep until there may be work: new rows, a freed slot, a retry coming due."""
        now = self._clock()
        if (self._next_due is not None and now >= self._next_due) or (
            now - self._looked_at >= IDLE_POLL
        ):
            # Under steady traffic the wake-ups never stop, so the timeout below never fires:
            # due retries (and rows `relayd outbox replay` queued) are looked for all the same.
            self._store_has_due = True
            self._next_due = None
        if self._wake.is_set():
            self._wake.clear()
            return
        timeout = IDLE_POLL
        if self._next_due is not None:
            timeout = min(timeout, max(0.0, self._next_due - self._clock()))
        if not await wait_event(self._wake, timeout):
            # A retry came due, or `relayd outbox replay` (another process) queued rows: look.
            self._store_has_due = True
            self._next_due = None
        self._wake.clear()

    async def _drain(self, grace: float) -> None:
        # Rows claimed but never started go back to the queue as they are.
        unstarted = [row.id for row in self._ready]
        self._ready.clear()
        if unstarted:
            await self._release(unstarted)
        if not self._in_flight:
            return
        under_way = dict(self._in_flight)
        _, late = await asyncio.wait(under_way, timeout=grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        # Cancelled attempts leave their rows in flight; put them back now so that
        # `outbox status` tells the truth (the next start would do it anyway). Rows whose result
        # was already recorded are left alone: release only touches rows still in flight.
        await self._release([under_way[task] for task in late])

    async def _release(self, ids: list[int]) -> None:
        try:
            await self._outbox.release(ids)
        except OutboxError as exc:
            # They stay marked in flight in the store, which the next start puts back in the
            # queue: nothing is lost, `outbox status` is only wrong until then.
            self._log.error("cannot put unsent rows back in the queue", error=str(exc))

    async def _deliver(self, row: Delivery) -> None:
        try:
            attempt = await self.post(row)
        finally:
            self._posting.discard(row.id)  # the slot is free; the result is recorded below
            self._wake.set()
        result = conclude(row, attempt, self.config.retry, self._clock())
        self._report(row, result)
        if self._on_result is not None:
            self._on_result(self.name, result)
        if result.next_attempt is not None:  # a retry now waits in the store
            self._next_due = min(self._next_due or result.next_attempt, result.next_attempt)
        while True:
            try:
                await self._outbox.record([result])
                return
            except OutboxError as exc:
                # Until recorded the row stays in flight (and holds an ordered queue): keep
                # trying rather than leave it there until the next restart.
                self._log.error("cannot record a delivery attempt, retrying", error=str(exc))
                await asyncio.sleep(RECORD_RETRY)

    async def post(self, row: Delivery) -> Attempt:
        """One POST of a row's body, exactly as stored."""
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **self.config.headers,
            **signature_headers(self._keys, row.message_id, int(self._clock()), row.body),
        }
        started = time.monotonic()
        try:
            async with self._session.post(
                self.config.url,
                data=row.body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                **self._request_options,
            ) as response:
                answer = await response.content.read(RESPONSE_KEEP)
                return Attempt(
                    status=response.status,
                    error=None if 200 <= response.status < 300 else f"HTTP {response.status}",
                    latency=time.monotonic() - started,
                    response=answer.decode("utf-8", "replace") or None,
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            error = f"timeout after {self.config.timeout:g}s"
        except aiohttp.ClientError as exc:
            error = describe_connection_error(exc) or f"{type(exc).__name__}: {exc}"
        return Attempt(
            status=None,
            error=error,
            latency=time.monotonic() - started,
            response=None,
            retry_after=None,
        )

    def _report(self, row: Delivery, result: AttemptResult) -> None:
        fields = {
            "message_id": row.message_id,
            "drive": row.drive,
            "attempt": row.attempts + 1,
            "status": result.status,
            "latency_ms": round((result.latency or 0) * 1000, 1),
        }
        now = time.monotonic()
        if result.state is State.DELIVERED:
            self._log.debug("delivered", **fields)
            self._tell(self.outage.succeeded(now))
            return
        if result.state is State.PENDING:
            retry_in = round((result.next_attempt or 0) - result.attempted_at, 1)
            self._log.debug(
                "delivery failed, will retry", error=result.error, retry_in=retry_in, **fields
            )
        else:
            self._log.error("delivery failed, dead-lettered", error=result.error, **fields)
        self.last_status = result.status
        self._tell(self.outage.failed(now, result.error or "failed"))

    def check_health(self, waiting: int) -> None:
        """Called now and then: logs the recovery (or a summary) when one is due, also when no
        attempt is being made."""
        self._tell(self.outage.tick(time.monotonic(), waiting=waiting))

    def _tell(self, report: Report | None) -> None:
        log_report(self._log, f"webhook {self.name}", report)
