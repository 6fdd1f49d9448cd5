"""What this replica should hold: the ring's answer against what it holds now (pure).

A replica takes only what the ring gives it, and only once the lease is free (the acquire
settles that); it drops what the ring gives to another, so that the other can take it
(drain-then-take: the old holder closes the socket and releases before the new one connects).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from relayd.cluster.ring import place
from relayd.store.base import Fence  # re-exported: what a held resource is written under

__all__ = [
    "Fence",
    "Plan",
    "drive_resource",
    "margin_for",
    "plan",
    "safe_until",
    "webhook_resource",
]


def drive_resource(name: str) -> str:
    return f"drive:{name}"


def webhook_resource(name: str) -> str:
    """An ordered webhook's lease: one replica at a time runs its dispatcher."""
    return f"webhook:{name}"


@dataclass(frozen=True)
class Plan:
    take: tuple[str, ...]  # the ring's and not held: acquire, then start
    drop: tuple[str, ...]  # held but another's (or no longer configured): stop, then release


def plan(resources: Iterable[str], live: Collection[str], me: str, held: Collection[str]) -> Plan:
    """`resources`: what the config asks for; `live`: replicas whose heartbeat holds.

    This replica counts as live even before its own heartbeat row is seen (`me` is always in
    the ring it computes): otherwise a replica that just started would drop everything.
    """
    wanted = list(dict.fromkeys(resources))
    owners = place(wanted, {*live, me})
    take = tuple(r for r in wanted if owners[r] == me and r not in held)
    drop = tuple(sorted(r for r in held if owners.get(r) != me))
    return Plan(take, drop)


def safe_until(sent: float, lease: float, margin: float) -> float:
    """Until when (our monotonic clock) a lease set by a statement sent at `sent` may be
    acted on: the database's expiry is its now + lease, its now no earlier than `sent`; the
    margin covers stopping the watchers (closing sockets) and a clock that runs a little slow."""
    return sent + lease - margin


def margin_for(lease: float) -> float:
    """A fifth of the lease, at least half a second: at 15 s, renewals every 5 s and a replica
    that cannot renew stops its drives 12 s after the last renewal it sent."""
    return max(0.5, lease / 5)
