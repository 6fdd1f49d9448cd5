"""A tenant's Graph budget, pause and fair turns (relayd/tenant.py): pure, no event loop."""

from __future__ import annotations

import heapq
import random
from pathlib import Path

import pytest

from relayd.config import AccountConfig
from relayd.tenant import (
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    Priority,
    TenantBudget,
    Ticket,
    tenant_key,
)


def max_in_any_window(times: list[float], window: float = 60.0) -> int:
    """The most of `times` that fall in any half-open interval [s, s + window)."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - window:
            start += 1
        most = max(most, end - start + 1)
    return most


def simulate(
    budget: TenantBudget, *, seconds: float, drives: int, seed: int
) -> tuple[list[float], list[Ticket]]:
    """Drives that always want to send, answers that take from 10 ms to 40 s, each request
    reaching Graph at a random moment between its grant and its answer. Returns the arrival
    times and the grants in order."""
    rng = random.Random(seed)
    now = 0.0
    answers: list[tuple[float, int, Ticket]] = []  # (answered at, tie-break, ticket)
    arrivals: list[float] = []
    granted: list[Ticket] = []
    for n in range(drives * 3):
        budget.submit(f"d{n % drives}", Priority.ROUND)
    while now < seconds:
        while (ticket := budget.grant(now)) is not None:
            latency = rng.choice([0.01, 0.2, rng.uniform(0, 40.0)])
            arrivals.append(now + rng.uniform(0, latency))
            granted.append(ticket)
            heapq.heappush(answers, (now + latency, len(granted), ticket))
            budget.submit(ticket.drive, Priority.ROUND)  # and it wants to send again
        wake = budget.next_check(now)
        now = min(answers[0][0] if answers else float("inf"), wake or float("inf"))
        while answers and answers[0][0] <= now:
            _, _, done = heapq.heappop(answers)
            budget.finish(done, now)
    return arrivals, granted


@pytest.mark.parametrize("seed", range(5))
def test_no_60_second_window_holds_more_arrivals_than_the_budget_whatever_the_latency(
    seed: int,
) -> None:
    budget = TenantBudget(120)
    arrivals, _ = simulate(budget, seconds=600, drives=30, seed=seed)
    assert max_in_any_window(arrivals) <= 120
    # ... and the budget is used, not just respected: over ten minutes, well over half of it.
    assert len(arrivals) >= 120 * 10 * 0.5


def test_a_full_budget_is_granted_at_once_then_the_next_waits_a_minute_after_the_answers() -> None:
    budget = TenantBudget(3)
    tickets = [budget.submit("d1", Priority.ROUND) for _ in range(5)]
    assert [budget.grant(0.0) for _ in range(4)] == [*tickets[:3], None]
    assert budget.next_check(0.0) is None  # all three in flight: only an answer frees a place
    for ticket in tickets[:3]:
        budget.finish(ticket, 2.0)
    assert budget.used(2.0) == 3
    assert budget.next_check(2.0) == 62.0
    assert budget.grant(61.9) is None
    assert budget.grant(62.0) is tickets[3]


def test_a_token_bucket_would_let_twice_the_rate_through_one_window_the_window_does_not() -> None:
    """Why not a token bucket: full at 60, refilled at 1/s, it grants 60 at 0 s and 59 more by
    59 s, 119 in one minute. The window grants 60, then nothing until a minute has passed."""
    budget = TenantBudget(60)
    arrivals: list[float] = []
    for second in range(120):
        budget.submit("d1", Priority.ROUND)
        budget.submit("d1", Priority.ROUND)
        while (ticket := budget.grant(float(second))) is not None:
            budget.finish(ticket, float(second))
            arrivals.append(float(second))
    assert max_in_any_window(arrivals) == 60


def test_a_renewal_goes_first_then_a_connect_then_a_round_and_a_poll_last() -> None:
    budget = TenantBudget(10)
    budget.throttled(0.0, 5.0)  # everything queues while the tenant is paused
    poll = budget.submit("d1", Priority.POLL)
    round_ = budget.submit("d2", Priority.ROUND)
    connect = budget.submit("d3", Priority.CONNECT)
    renew = budget.submit("d4", Priority.RENEW)
    assert budget.grant(1.0) is None
    assert [budget.grant(5.0) for _ in range(5)] == [renew, connect, round_, poll, None]


def test_drives_take_turns_so_a_busy_drive_does_not_hold_back_another() -> None:
    budget = TenantBudget(1)
    busy = [budget.submit("busy", Priority.ROUND) for _ in range(5)]
    other = budget.submit("other", Priority.ROUND)
    order = []
    now = 0.0
    while (ticket := budget.grant(now)) is not None or budget.waiting:
        if ticket is None:
            now = budget.next_check(now) or now
            continue
        order.append(ticket)
        budget.finish(ticket, now)
    assert order == [busy[0], other, *busy[1:]]


def test_a_withdrawn_request_takes_no_turn_and_a_cancelled_grant_no_place() -> None:
    budget = TenantBudget(1)
    gone = budget.submit("d1", Priority.ROUND)
    kept = budget.submit("d2", Priority.ROUND)
    budget.withdraw(gone)
    assert budget.waiting == 1
    assert budget.grant(0.0) is kept
    budget.finish(kept, 0.0, sent=False)  # never sent: the place is free again at once
    later = budget.submit("d1", Priority.ROUND)
    assert budget.grant(0.0) is later


def test_a_throttle_pauses_every_grant_for_retry_after_and_is_never_shortened() -> None:
    budget = TenantBudget(100)
    assert budget.throttled(10.0, 30.0) == 30.0
    assert budget.throttled(12.0, 5.0) == 28.0  # a shorter Retry-After does not cut it short
    budget.submit("d1", Priority.CONNECT)
    assert budget.grant(39.9) is None
    assert budget.next_check(39.9) == 40.0
    assert budget.grant(40.0) is not None
    assert budget.throttled_seconds(25.0) == 15.0
    assert budget.throttled_seconds(100.0) == 30.0
    budget.throttled(200.0, 2.0)
    assert budget.throttled_seconds(300.0) == 32.0
    assert budget.throttles == 3


def test_a_throttle_without_retry_after_backs_off_until_an_answer_succeeds() -> None:
    budget = TenantBudget(100)
    pauses = []
    now = 0.0
    for _ in range(10):
        pauses.append(budget.throttled(now, None))
        now += 1000.0
    assert pauses[:3] == [THROTTLE_INITIAL, THROTTLE_INITIAL * 2, THROTTLE_INITIAL * 4]
    assert pauses[-1] == THROTTLE_MAX
    budget.succeeded()
    assert budget.throttled(now, None) == THROTTLE_INITIAL


def test_which_tenant_an_account_counts_against(tmp_path: Path) -> None:
    guid = "00000000-0000-0000-0000-000000000000"
    named = AccountConfig(client_id=guid, tenant="Contoso.onmicrosoft.com")
    assert tenant_key("work", named) == "contoso.onmicrosoft.com"
    assert tenant_key("work", AccountConfig(client_id=guid)) == "account:work"  # organizations
    file = AccountConfig(token_file=tmp_path / "token")
    assert tenant_key("ci", file) == "account:ci"
    shared = AccountConfig(token_file=tmp_path / "token", throttle_tenant="contoso")
    assert tenant_key("ci", shared) == "contoso"
