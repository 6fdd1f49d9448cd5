"""Rows and a clock for the store tests."""

from __future__ import annotations

from relayd.store import AttemptResult, Delivery, NewDelivery, State

T0 = 1_800_000_000.0  # "now" for the fake clock: a fixed Unix time


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new(n: int, *, webhook: str = "hook", drive: str = "d1", created: float = T0) -> NewDelivery:
    return NewDelivery(
        message_id=f"msg_{webhook}_{drive}_{n}",
        webhook=webhook,
        drive=drive,
        body=b'{"n":%d,"text":"\xc3\xa9"}' % n,
        created=created,
    )


def result(row: Delivery, state: State, **fields: object) -> AttemptResult:
    return AttemptResult(id=row.id, state=state, attempted_at=T0, **fields)  # type: ignore[arg-type]
