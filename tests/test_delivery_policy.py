"""What an answer means and when to try again: relayd.delivery's pure half."""

import pytest

from relayd.config import RetryConfig
from relayd.delivery import Attempt, conclude, judge, retry_delay
from relayd.store import Delivery, State

POLICY = RetryConfig(initial_delay=5, max_delay=3600, max_age=3 * 86400)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "delivered"),
        (204, "delivered"),
        (299, "delivered"),
        (None, "retry"),
        (408, "retry"),
        (429, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (301, "dead"),
        (302, "dead"),
        (400, "dead"),
        (401, "dead"),
        (404, "dead"),
        (410, "dead"),
        (413, "dead"),
    ],
)
def test_only_2xx_delivers_and_only_transient_failures_retry(
    status: int | None, verdict: str
) -> None:
    assert judge(status) == verdict


def test_backoff_doubles_from_initial_delay_with_bounded_jitter() -> None:
    low = [retry_delay(n, POLICY, rand=lambda: 0.0) for n in range(1, 5)]
    high = [retry_delay(n, POLICY, rand=lambda: 1.0) for n in range(1, 5)]
    assert low == pytest.approx([4, 8, 16, 32])
    assert high == pytest.approx([6, 12, 24, 48])


def test_backoff_is_capped_at_max_delay() -> None:
    assert retry_delay(40, POLICY, rand=lambda: 1.0) == 3600
    assert retry_delay(10_000, POLICY, rand=lambda: 0.5) == 3600


def test_retry_after_is_honoured_when_longer_and_capped() -> None:
    assert retry_delay(1, POLICY, retry_after=120, rand=lambda: 0.5) == 120
    assert retry_delay(1, POLICY, retry_after=1, rand=lambda: 0.5) == 5
    assert retry_delay(1, POLICY, retry_after=10**9, rand=lambda: 0.5) == 3600


def _row(attempts: int = 0, retry_from: float = 1000.0) -> Delivery:
    return Delivery(
        id=7,
        message_id="msg_x",
        webhook="w",
        drive="d",
        body=b"{}",
        created=retry_from,
        retry_from=retry_from,
        attempts=attempts,
    )


def test_conclusions() -> None:
    ok = conclude(_row(), Attempt(200, None, 0.01, "", None), POLICY, now=1001)
    assert ok.state is State.DELIVERED and ok.next_attempt is None
    again = conclude(_row(), Attempt(503, "HTTP 503", 0.01, "busy", None), POLICY, now=1001)
    assert again.state is State.PENDING and 1001 + 4 <= (again.next_attempt or 0) <= 1001 + 6
    gone = conclude(_row(), Attempt(410, "HTTP 410", 0.01, "", None), POLICY, now=1001)
    assert gone.state is State.DEAD and gone.status == 410


def test_a_retry_past_max_age_is_a_dead_letter() -> None:
    old = _row(attempts=30, retry_from=0.0)
    result = conclude(
        old, Attempt(None, "timeout after 15s", 15.0, None, None), POLICY, now=3 * 86400 - 10
    )
    assert result.state is State.DEAD
    assert result.error is not None and "max_age" in result.error and "timeout" in result.error


def test_a_retry_from_in_the_future_counts_as_now() -> None:
    """Written while the clock ran ahead: max_age must count from now, not from then."""
    policy = RetryConfig(initial_delay=60, max_delay=3600, max_age=30)
    ahead = _row(attempts=0, retry_from=1000.0 + 86400)
    result = conclude(ahead, Attempt(503, "HTTP 503", 0.01, "", None), policy, now=1000.0)
    assert result.state is State.DEAD  # the first retry (~60 s) is already past max_age (30 s)
    assert result.error == "HTTP 503; gave up after max_age"
