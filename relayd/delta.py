"""Changes, not pings: a drive's delta cursor and the rounds that move it (`mode: changes`).

A socketIo notification only says "something in this drive changed". In changes mode the drive
keeps a delta cursor (`GET {drive}/root/delta`, following `@odata.nextLink` to the
`@odata.deltaLink`) and posts the changed items themselves. Each page's items and the link that
follows it are committed to the outbox in one transaction, so a crash neither skips a page nor
posts one twice: it is fetched again from the link that was stored.

Rounds are coalesced: a burst of notifications waits for a quiet period (never longer than a
maximum delay) and becomes one round; a follow-up round catches what a delta run right after a
notification can miss. After every connect, reconnect or renewal the drive runs a catch-up round,
so changes made while no socket was listening are posted too.

The push channel is not the authority (notifications arrive late, or not at all): a drive that
ran no round for `changes.poll_interval` runs one anyway, the safety-net poll. Its requests are
last in their tenant's line (relayd/tenant.py): nothing says anything changed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import structlog

from relayd.auth import AuthError, TokenProvider
from relayd.config import DriveConfig
from relayd.events import changes_deliveries, resync_deliveries
from relayd.graph import GraphClient, GraphError, InvalidGraphResponse, retry_delay
from relayd.store import Fence, Fenced, NewDelivery, OutboxError, Store
from relayd.tenant import DEFAULT_TENANT, Priority
from relayd.waiting import wait_event

OUTBOX_RETRY = 1.0
# The safety-net poll comes due after poll_interval less up to this fraction of it, drawn anew
# each time: drives started (or notified) together drift apart instead of polling in step, and
# no drive ever goes longer than poll_interval without a round.
POLL_JITTER = 0.2


@dataclass(frozen=True)
class DeltaPage:
    items: list[dict[str, Any]]
    next_link: str | None
    delta_link: str | None

    @property
    def link(self) -> str:
        """Where to continue from once this page is stored."""
        link = self.next_link or self.delta_link
        assert link is not None
        return link


def parse_delta_page(body: object) -> DeltaPage:
    """Read one page of a delta query; pure."""
    if not isinstance(body, Mapping):
        raise InvalidGraphResponse("delta page is not a JSON object")
    items = body.get("value")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise InvalidGraphResponse("delta page has no 'value' list of items")
    next_link, delta_link = body.get("@odata.nextLink"), body.get("@odata.deltaLink")
    if not isinstance(next_link, str | None) or not isinstance(delta_link, str | None):
        raise InvalidGraphResponse("delta page links are not strings")
    if next_link is None and delta_link is None:
        raise InvalidGraphResponse("delta page has neither @odata.nextLink nor @odata.deltaLink")
    return DeltaPage(items=items, next_link=next_link, delta_link=delta_link)


def start_url(
    graph: GraphClient, drive: DriveConfig, *, baseline: bool, address: str | None = None
) -> str:
    """The first delta URL: from "now" (`token=latest`) or a full enumeration. `address` is
    where the drive's requests go (`drives/{id}` once resolved), by default its resource."""
    query: dict[str, str] = {}
    if baseline:
        query["token"] = "latest"
    if drive.changes.select:
        query["$select"] = ",".join(drive.changes.select)
    url = graph.drive_url(address or drive.resource, "delta")
    return f"{url}?{urlencode(query)}" if query else url


def poll_delay(interval: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds from the end of a round until the safety-net poll is due; pure."""
    return interval * (1.0 - POLL_JITTER * rand())


PROGRESS_EVERY = 10.0  # seconds between "delta round in progress" lines of a long round


@dataclass
class RoundProgress:
    """How far a delta round has got: a first sync or a large catch-up takes minutes, and says
    so every PROGRESS_EVERY seconds (in the log, `relayd status` and the metrics); pure."""

    reason: str
    started: float  # time.monotonic()
    pages: int = 0
    items: int = 0
    _last_line: float = 0.0
    _now: float = 0.0

    def __post_init__(self) -> None:
        self._last_line = self._now = self.started

    def page(self, items: int) -> None:
        self.pages += 1
        self.items += items

    def due(self, now: float) -> bool:
        """Whether a progress line is due now (and, if so, the next one in PROGRESS_EVERY)."""
        self._now = now
        if now - self._last_line < PROGRESS_EVERY:
            return False
        self._last_line = now
        return True

    def fields(self, now: float | None = None) -> dict[str, float | int]:
        """What a progress line (or /status) says; `now` defaults to the last page's time."""
        elapsed = max(0.0, (self._now if now is None else now) - self.started)
        return {
            "pages": self.pages,
            "items": self.items,
            "seconds": round(elapsed, 1),
            "items_per_second": round(self.items / elapsed, 1) if elapsed > 0 else 0.0,
        }


def is_resync(error: GraphError) -> bool:
    """410 Gone: the cursor is no longer valid (resyncRequired, resyncChanges...)."""
    return error.status == 410


class ChangeFeed:
    """One drive's delta cursor, its coalesced rounds, and their catch-ups."""

    def __init__(
        self,
        drive: DriveConfig,
        *,
        graph: GraphClient,
        tokens: TokenProvider,
        outbox: Store,
        tenant: str = DEFAULT_TENANT,
        fence: Fence | None = None,
        on_fenced: Callable[[Fenced], None] | None = None,
    ) -> None:
        """`fence`: the cluster lease the cursor and rows are written under; `on_fenced`: told
        when the store refused one (another replica holds the drive: rounds end)."""
        self.fence = fence
        self._on_fenced = on_fenced
        self.drive = drive
        self.tenant = tenant
        self.rounds = 0
        self.polls = 0  # rounds the safety net ran
        self.items = 0
        self.pages = 0
        self.progress: RoundProgress | None = None  # the round under way, if any
        self._graph = graph
        self._tokens = tokens
        self._outbox = outbox
        self._cursor: str | None = None
        self.address = drive.resource  # drives/{id} once the watcher resolved it
        self._wake = asyncio.Event()
        self._first: float | None = None  # first notification not yet covered by a round
        self._last: float | None = None
        self._follow_up_at: float | None = None
        self._catch_up: str | None = None
        self._poll_at: float | None = None
        self.log = structlog.get_logger("relayd.delta").bind(drive=drive.name)

    # -- triggers (called by the watcher) ---------------------------------------------------------

    def notified(self) -> None:
        now = time.monotonic()
        self._first = self._first if self._first is not None else now
        self._last = now
        self._wake.set()

    def catch_up(self, reason: str) -> None:
        self._catch_up = reason
        self._wake.set()

    def lag(self, now: float) -> float:
        """Seconds since the oldest notification no round has covered yet (0: none waits);
        `now` on the monotonic clock."""
        return 0.0 if self._first is None else max(0.0, now - self._first)

    # -- the cursor -------------------------------------------------------------------------------

    async def ensure_cursor(self, address: str) -> None:
        """Have a cursor before the socket connects, so no change falls before the first one.

        A drive seen before continues from its stored cursor. A new drive (or one whose resource
        changed) starts from "now", or from a full enumeration with `initial_sync: true`, at
        `address` (`drives/{id}`). A stored cursor is Graph's own link and is followed as is,
        even one an older relayd took through `me/drive`: relayd never edits Graph's links.
        """
        self.address = address
        stored = await self._outbox.drive_state(self.drive.name)
        if stored is not None and stored[0] == self.drive.resource and stored[1]:
            self._cursor = stored[1]
            return
        initial_sync = self.drive.changes.initial_sync
        if initial_sync:
            cursor = start_url(self._graph, self.drive, baseline=False, address=address)
        else:
            page = parse_delta_page(
                await self._graph.get_json(
                    start_url(self._graph, self.drive, baseline=True, address=address),
                    self._tokens.token,
                    tenant=self.tenant,
                    drive=self.drive.name,
                    priority=Priority.CONNECT,  # the socket waits for it
                )
            )
            cursor = page.link
        await self._outbox.save_drive_state(
            self.drive.name, self.drive.resource, cursor, fence=self.fence
        )
        self._cursor = cursor
        self.log.info("delta cursor taken", initial_sync=initial_sync)

    # -- rounds -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run rounds as triggers come due, until cancelled."""
        self._schedule_poll()  # a drive that never connects (once it has a cursor) still polls
        while True:
            due = self._next_due()
            now = time.monotonic()
            if due is None or due > now:
                timeout = None if due is None else due - now
                await wait_event(self._wake, timeout)
                self._wake.clear()
                continue
            reason = self._take_due(now)
            if self._cursor is None:  # a poll before the drive ever got its cursor: next time
                self._schedule_poll()
                continue
            await self.round(reason)

    def _next_due(self) -> float | None:
        candidates = []
        if self._catch_up is not None:
            candidates.append(0.0)
        if self._first is not None and self._last is not None:
            quiet = self._last + self.drive.changes.quiet_period
            candidates.append(min(quiet, self._first + self.drive.changes.max_delay))
        if self._follow_up_at is not None:
            candidates.append(self._follow_up_at)
        if self._poll_at is not None:
            candidates.append(self._poll_at)
        return min(candidates) if candidates else None

    def _take_due(self, now: float) -> str:
        follow_up = self.drive.changes.follow_up
        if self._catch_up is not None:
            reason, self._catch_up = self._catch_up, None
            self._first = self._last = self._follow_up_at = None  # the round covers them
            return reason
        if self._first is not None:
            self._first = self._last = None
            self._follow_up_at = now + follow_up if follow_up > 0 else None
            return "notification"
        if self._follow_up_at is not None and self._follow_up_at <= now:
            self._follow_up_at = None
            return "follow-up"
        return "poll"

    def _schedule_poll(self) -> None:
        interval = self.drive.changes.poll_interval
        self._poll_at = time.monotonic() + poll_delay(interval) if interval > 0 else None

    async def round(self, reason: str) -> int:
        """Follow the cursor to the end, posting what changed; returns the items posted."""
        assert self._cursor is not None, "ensure_cursor() first"
        drive = self.drive
        posted = 0
        attempt = 0
        priority = Priority.POLL if reason == "poll" else Priority.ROUND
        progress = self.progress = RoundProgress(reason, time.monotonic())
        while True:
            try:
                page = parse_delta_page(
                    await self._graph.get_json(
                        self._cursor,
                        self._tokens.token,
                        tenant=self.tenant,
                        drive=drive.name,
                        priority=priority,
                    )
                )
            except GraphError as error:
                if is_resync(error):
                    await self._resync(error)
                    continue
                attempt += 1
                await self._pause_after(error, attempt)
                continue
            except (AuthError, InvalidGraphResponse, OSError, TimeoutError) as error:
                attempt += 1
                await self._pause_after(error, attempt)
                continue
            attempt = 0
            deliveries = changes_deliveries(
                drive.name,
                drive.resource,
                drive.webhook,
                page.items,
                time.time(),
                max_items=drive.changes.max_items,
            )
            await self._store(page.link, deliveries)
            posted += len(page.items)
            progress.page(len(page.items))
            if progress.due(time.monotonic()):
                self.log.info("delta round in progress", reason=reason, **progress.fields())
            if page.delta_link is not None:
                break
        self.rounds += 1
        self.polls += reason == "poll"
        self.items += posted
        self._schedule_poll()  # any round resets the safety net's clock
        self.pages += progress.pages
        self.log.info("delta round", reason=reason, **progress.fields(time.monotonic()))
        self.progress = None
        return posted

    async def _store(self, link: str, deliveries: list[NewDelivery]) -> None:
        while True:
            try:
                await self._outbox.save_drive_state(
                    self.drive.name, self.drive.resource, link, deliveries, fence=self.fence
                )
                self._cursor = link
                return
            except Fenced as exc:  # never retried: the cursor is another replica's to move
                if self._on_fenced is not None:
                    self._on_fenced(exc)
                raise
            except OutboxError as exc:
                self.log.error("cannot write to the outbox, retrying", error=str(exc))
                await asyncio.sleep(OUTBOX_RETRY)

    async def _resync(self, error: GraphError) -> None:
        """Graph dropped the cursor: start again where it says, and tell the receivers."""
        drive = self.drive
        # Without a Location: a full enumeration if the drive asked for one at first, else "now"
        # (the resync notice tells receivers to look for themselves). The next page resolves it.
        cursor = error.location or start_url(
            self._graph, drive, baseline=not drive.changes.initial_sync, address=self.address
        )
        notice = resync_deliveries(
            drive.name, drive.resource, drive.webhook, f"delta {error.code}", time.time()
        )
        self.log.warning("delta cursor reset by Graph", code=error.code)
        await self._store(cursor, notice)

    async def _pause_after(self, error: BaseException, attempt: int) -> None:
        delay = retry_delay(attempt, error)
        self.log.warning(
            "delta page failed; retrying from the same cursor",
            error=f"{type(error).__name__}: {error}",
            retry_in=round(delay, 1),
        )
        await asyncio.sleep(delay)
