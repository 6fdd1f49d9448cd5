"""This replica's part in the cluster: heartbeat, renew, place, take and drop, until stopped.

One task (owned by the supervisor's TaskGroup) runs `ClusterMember.run`. Every `lease / 3` it
heartbeats and renews in one transaction, then computes the ring over the live replicas and
takes (acquire, then start) or drops (stop, then release) what differs. A NOTIFY from another
replica (it joined, left, or released a lease) starts a round at once.

The one promise that matters: this replica never acts on a lease that may have expired. Each
lease is trusted until `safe_until` (the monotonic moment its last renewal was *sent*, plus the
lease, minus a margin); a renewal that fails or hangs is cut off at that moment, and the drives
whose leases it covered are stopped (sockets closed) before anyone else can take them. The
store's fence check is the second line: a write made under an epoch that lost is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from relayd.cluster.coordinator import (
    ACQUIRE_BATCH,
    Coordinator,
    CoordinatorError,
    LeaseRow,
    ReplicaRow,
)
from relayd.cluster.placement import margin_for, plan, safe_until
from relayd.store.base import Fence
from relayd.waiting import wait_event

__all__ = ["ClusterMember", "Holder", "Lease"]

log = structlog.get_logger("relayd.cluster")

# How long a SIGTERM waits for the release and the leave: past it, the leases run out by
# themselves (after `lease`), which is slower but just as safe.
LEAVE_TIMEOUT = 3.0


class Holder(Protocol):
    """What the member drives: the supervisor, which runs a watcher (or an ordered webhook's
    dispatcher) for each resource held."""

    def resources(self) -> Sequence[str]:
        """Every resource the config asks this cluster to run ("drive:NAME", "webhook:NAME")."""

    async def take(self, fence: Fence) -> None:
        """Start what `fence.resource` names, writing under `fence`."""

    async def drop(self, resources: Sequence[str], *, within: float) -> None:
        """Stop them (sockets closed, what was received written) before returning, and within
        `within` seconds: what has not stopped by then is cut short (cancelled)."""


@dataclass
class Lease:
    fence: Fence
    safe_until: float  # monotonic


@dataclass
class ClusterMember:
    coordinator: Coordinator
    holder: Holder
    lease: float
    clock: Callable[[], float] = time.monotonic
    held: dict[str, Lease] = field(default_factory=dict)
    renew_failures: int = 0
    last_beat: float | None = None  # monotonic, of the last successful heartbeat
    live: tuple[str, ...] = ()
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _fenced: set[str] = field(default_factory=set)
    _failing_since: float | None = None
    _recheck_at: float | None = None  # monotonic: when another replica's row runs out

    @property
    def replica(self) -> str:
        return self.coordinator.replica

    @property
    def interval(self) -> float:
        return self.lease / 3

    @property
    def healthy(self) -> bool:
        """The last heartbeat is recent (within the lease): this replica takes part."""
        return self.last_beat is not None and self.clock() - self.last_beat < self.lease

    def wake(self) -> None:
        """Place again now (a NOTIFY from another replica, a reload)."""
        self._wake.set()

    def fenced(self, resource: str) -> None:
        """A watcher found its fence no longer holds: forget the lease (another holds it)."""
        self._fenced.add(resource)
        self._wake.set()

    def fence(self, resource: str) -> Fence | None:
        lease = self.held.get(resource)
        return None if lease is None else lease.fence

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled; then `leave()` gives everything up."""
        while True:
            started = self.clock()
            try:
                await self.round()
            except Exception:  # a bug here must not end placement: the guard must keep running
                log.exception("cluster round failed; trying again")
            await self._sleep_until(started + self.interval)

    async def round(self) -> None:
        await self._stop_expired()
        await self._forget_fenced()
        try:
            beat = await self.coordinator.beat(
                [lease.fence for lease in self.held.values()], timeout=self._budget()
            )
        except CoordinatorError as exc:
            self._renew_failed(str(exc))
            return
        self._renewed()
        self.last_beat = beat.sent
        self.live = beat.live
        # Just after it: a live replica renews well before, a dead one's drives are free then.
        self._recheck_at = None if beat.next_expiry is None else beat.sent + beat.next_expiry + 0.05
        lost = [r for r, lease in self.held.items() if lease.fence not in beat.renewed]
        if lost:
            log.warning("leases lost to another replica; stopping their drives", resources=lost)
            await self._forget_and_drop(lost)
        until = safe_until(beat.sent, self.lease, margin_for(self.lease))
        for lease in self.held.values():
            lease.safe_until = until
        await self._place()

    async def _place(self) -> None:
        decided = plan(self.holder.resources(), self.live, self.replica, self.held)
        if decided.drop:
            # Drain, then release: the socket is closed before anyone else may open one, and
            # before the lease could run out (a drive slow to stop once held the others' guard
            # past it, and its drives were connected twice).
            await self.holder.drop(decided.drop, within=self._stop_within(decided.drop))
            leases = [self.held.pop(r).fence for r in decided.drop]
            log.info("handing drives over", resources=list(decided.drop))
            with contextlib.suppress(CoordinatorError):  # else they expire by themselves
                await self.coordinator.release(leases, timeout=self._budget())
        wanted = list(decided.take)
        while wanted:
            if self._time_left() < self.interval:
                break  # renewing what is held comes first: the next round takes the rest
            batch, wanted = wanted[:ACQUIRE_BATCH], wanted[ACQUIRE_BATCH:]
            try:
                # What is not taken is still its old holder's: the next round tries again.
                taken, sent = await self.coordinator.acquire_many(batch, timeout=self._budget())
            except CoordinatorError as exc:
                self._renew_failed(str(exc))
                return
            until = safe_until(sent, self.lease, margin_for(self.lease))
            order = {resource: index for index, resource in enumerate(batch)}
            for fence in sorted(taken, key=lambda f: order[f.resource]):
                self.held[fence.resource] = Lease(fence, until)
                await self.holder.take(fence)

    async def _stop_expired(self) -> None:
        """The guard: once one lease may run out before we could renew it, everything held
        stops now. One renewal covers every lease, so the others cannot be renewed either, and
        stopping them together means the stop (which may wait for writes that cannot happen)
        never delays the guard of a lease acquired a little later."""
        now = self.clock()
        if not any(lease.safe_until <= now for lease in self.held.values()):
            return
        expiring = sorted(self.held)
        log.error(
            "cannot renew leases in time; stopping their drives before the leases run out",
            drives=sum(1 for r in expiring if r.startswith("drive:")),
            leases=len(expiring),
        )
        await self._forget_and_drop(expiring)

    async def _forget_fenced(self) -> None:
        fenced = [r for r in self._fenced if r in self.held]
        self._fenced.clear()
        if fenced:
            await self._forget_and_drop(fenced)

    async def _forget_and_drop(self, resources: list[str]) -> None:
        """Leases that can no longer be trusted: forgotten at once (nothing renews or releases
        them), then their resources stopped within what is left of the earliest one."""
        within = self._stop_within(resources)
        for resource in resources:
            del self.held[resource]
        await self.holder.drop(resources, within=within)

    def _stop_within(self, resources: Sequence[str]) -> float:
        """How long stopping `resources` may take: until halfway between the earliest of their
        leases' safe moments and its expiry (the margin past the safe moment), at least 50 ms."""
        earliest = min(self.held[r].safe_until for r in resources)
        return max(0.05, earliest + margin_for(self.lease) / 2 - self.clock())

    def _time_left(self) -> float:
        """Until the earliest held lease's safe moment (infinite when nothing is held)."""
        earliest = min((lease.safe_until for lease in self.held.values()), default=None)
        return float("inf") if earliest is None else earliest - self.clock()

    def _budget(self) -> float:
        """How long a statement may take: never past the earliest lease's safe moment, so
        that a hanging network cannot delay the guard."""
        earliest = min((lease.safe_until for lease in self.held.values()), default=None)
        budget = self.coordinator.timeout
        if earliest is not None:
            budget = min(budget, earliest - self.clock())
        return max(0.05, budget)

    def _renew_failed(self, error: str) -> None:
        self.renew_failures += 1
        if self._failing_since is None:
            self._failing_since = self.clock()
            log.error("cannot reach PostgreSQL to renew leases", error=error, held=len(self.held))

    def _renewed(self) -> None:
        if self._failing_since is not None:
            log.info(
                "PostgreSQL reachable again; leases renewed",
                after_seconds=round(self.clock() - self._failing_since, 1),
            )
            self._failing_since = None

    async def _sleep_until(self, moment: float) -> None:
        """Until the next round, a wake-up, or the earliest lease's safe moment."""
        earliest = min((lease.safe_until for lease in self.held.values()), default=moment)
        if self._recheck_at is not None:
            earliest = min(earliest, self._recheck_at)
        delay = min(moment, earliest) - self.clock()
        if delay > 0:
            await wait_event(self._wake, delay)
        self._wake.clear()

    # -- leaving ---------------------------------------------------------------------------------

    async def release(self, prefix: str) -> None:
        """Give up at once the leases whose resource starts with `prefix`, once what they
        cover has stopped (SIGTERM: drives after their watchers, ordered webhooks after their
        dispatchers), so the others take them now rather than after `lease`."""
        gone = [r for r in self.held if r.startswith(prefix)]
        leases = [self.held.pop(r).fence for r in gone]
        try:
            await self.coordinator.release(leases, timeout=LEAVE_TIMEOUT)
        except CoordinatorError as exc:
            log.warning("cannot release leases; they run out by themselves", error=str(exc))

    async def leave(self) -> None:
        """The replica stops: what it still holds is released, its heartbeat row expires now
        (the others' rings drop it at once), and the connection closes."""
        await self.release("")
        try:
            await self.coordinator.leave(timeout=LEAVE_TIMEOUT)
        except CoordinatorError as exc:
            log.warning("cannot say this replica leaves; its row expires by itself", error=str(exc))
        await self.coordinator.close()

    # -- the view --------------------------------------------------------------------------------

    async def view(self, resources: Sequence[str]) -> tuple[list[ReplicaRow], list[LeaseRow]]:
        return await self.coordinator.view(resources, timeout=2.0)
