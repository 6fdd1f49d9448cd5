"""Rendezvous placement: what a user notices is how many drives reconnect when a replica comes
or goes. Adding one moves about 1/N of the drives, all to the newcomer; removing one moves only
its own; every replica computing the placement gets the same answer."""

from __future__ import annotations

from collections import Counter

from relayd.cluster.placement import margin_for, plan, safe_until
from relayd.cluster.ring import owner, place

DRIVES = [f"drive:user-{i:05d}" for i in range(3000)]


def test_every_drive_has_one_owner_and_the_spread_is_even() -> None:
    placement = place(DRIVES, ["a", "b", "c"])
    assert set(placement) == set(DRIVES)
    counts = Counter(placement.values())
    assert set(counts) == {"a", "b", "c"}
    for held in counts.values():  # 1000 each on average; a 15% band is ~8 standard deviations
        assert 850 <= held <= 1150, counts


def test_the_answer_does_not_depend_on_the_order_replicas_are_listed() -> None:
    assert place(DRIVES, ["a", "b", "c"]) == place(DRIVES, ["c", "a", "b", "a"])


def test_a_fourth_replica_takes_about_a_quarter_and_only_moves_drives_to_itself() -> None:
    before = place(DRIVES, ["a", "b", "c"])
    after = place(DRIVES, ["a", "b", "c", "d"])
    moved = [drive for drive in DRIVES if before[drive] != after[drive]]
    assert all(after[drive] == "d" for drive in moved)
    assert 0.20 * len(DRIVES) <= len(moved) <= 0.30 * len(DRIVES), len(moved)


def test_removing_a_replica_moves_only_the_drives_it_held() -> None:
    before = place(DRIVES, ["a", "b", "c", "d"])
    after = place(DRIVES, ["a", "b", "d"])
    moved = {drive for drive in DRIVES if before[drive] != after[drive]}
    assert moved == {drive for drive in DRIVES if before[drive] == "c"}


def test_no_replicas_means_no_owner() -> None:
    assert place(DRIVES, []) == {}
    assert owner("drive:x", []) is None


def test_a_plan_takes_what_the_ring_gives_and_drops_what_it_gives_away() -> None:
    drives = [f"drive:{i}" for i in range(40)]
    owners = place(drives, ["a", "b"])
    mine = {d for d in drives if owners[d] == "a"}
    # Alone so far (b's heartbeat not seen): a takes everything, even before its own row shows.
    assert set(plan(drives, [], "a", set()).take) == set(drives)
    # b is live: a keeps its share, drops b's, takes nothing it holds already.
    decided = plan(drives, ["a", "b"], "a", set(drives))
    assert set(decided.drop) == set(drives) - mine
    assert decided.take == ()
    # A drive no longer configured is dropped; a new one of a's is taken.
    decided = plan([*drives[1:], "drive:new"], ["a", "b"], "a", mine)
    assert (drives[0] in mine) == (drives[0] in decided.drop)
    assert ("drive:new" in decided.take) == (owner("drive:new", ["a", "b"]) == "a")


def test_a_lease_is_trusted_until_it_was_sent_plus_lease_minus_the_margin() -> None:
    assert margin_for(15.0) == 3.0
    assert margin_for(2.0) == 0.5
    assert safe_until(100.0, 15.0, margin_for(15.0)) == 112.0
