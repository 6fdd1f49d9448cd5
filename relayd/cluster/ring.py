"""Rendezvous (highest-random-weight) placement of drives over live replicas: pure, no I/O.

Every replica computes the same answer from the same two lists (its view of the live replicas,
the configured drives), so nobody coordinates placement: the lease rows only settle the moments
when two views differ. Rendezvous hashing moves only what it must: adding an N+1th replica moves
about 1/(N+1) of the drives (each to the newcomer), removing one moves only the drives it had.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

__all__ = ["owner", "place", "weight"]


def weight(replica: str, key: str) -> int:
    """A replica's pseudo-random weight for a key: stable across processes, versions and
    machines (no PYTHONHASHSEED), 64 bits so that ties never happen in practice."""
    digest = hashlib.blake2b(f"{replica}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(key: str, replicas: Iterable[str]) -> str | None:
    """The replica a key belongs to: the highest weight (ties broken by name); None if there
    are no replicas."""
    best: tuple[int, str] | None = None
    for replica in replicas:
        candidate = (weight(replica, key), replica)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]


def place(keys: Iterable[str], replicas: Iterable[str]) -> Mapping[str, str]:
    """Every key's owner among `replicas` (empty when there are none)."""
    members = sorted(set(replicas))
    if not members:
        return {}
    return {key: owner(key, members) or "" for key in keys}
