"""A failing webhook or drive as a few log lines: when it starts, a summary at most once a
minute while it lasts, and when it is over; pure (the caller passes the clock).

Logging every failed attempt buries the one line an operator needs ("is it down, since when,
and is it back?") under thousands of lookalikes. An `Outage` turns a stream of attempt results
into three kinds of report. Recovery needs a quiet spell (`settle`): a webhook that answers one
request in two is failing, not recovering every other second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SUMMARY_EVERY = 60.0
SETTLE = 5.0

ReportKind = Literal["failing", "still failing", "recovered"]


@dataclass(frozen=True)
class Report:
    """One line to log. `fields` are what the line says beyond its kind."""

    kind: ReportKind
    fields: dict[str, object] = field(default_factory=dict)


def spell(seconds: float) -> str:
    """3d1h, 4m12s, 2h3m, 45s: a duration as people write it."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 24:
        return f"{hours // 24}d{hours % 24}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Outage:
    """The health of one webhook (or drive), fed with every attempt's outcome."""

    def __init__(self, *, summary_every: float = SUMMARY_EVERY, settle: float = SETTLE) -> None:
        self._summary_every = summary_every
        self._settle = settle
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._last_line = 0.0
        self._first_success: float | None = None  # the first success since the last failure
        self._failed = 0  # failed attempts since the outage began
        self._failed_since_line = 0
        self._succeeded = 0  # successful attempts since the outage began
        self._succeeded_since_line = 0

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def failed(self, now: float, error: str) -> Report | None:
        self.last_error = error
        self._first_success = None
        if self.failing_since is None:
            self.failing_since = self._last_line = now
            self._failed, self._failed_since_line = 1, 0  # this one is in the "failing" line
            self._succeeded = self._succeeded_since_line = 0
            return Report("failing", {"error": error})
        self._failed += 1
        self._failed_since_line += 1
        return self._summary(now)

    def succeeded(self, now: float) -> Report | None:
        if self.failing_since is None:
            return None
        self._succeeded += 1
        self._succeeded_since_line += 1
        if self._first_success is None:
            self._first_success = now
        return self.tick(now)

    def tick(self, now: float, *, waiting: int | None = None) -> Report | None:
        """Called now and then (and after each result): the recovery once the first success
        is `settle` seconds old with no failure since, else a summary when one is due."""
        if self.failing_since is None:
            return None
        if self._first_success is not None and now - self._first_success >= self._settle:
            # The outage ended at the first success of the quiet spell, not at this check.
            report = Report(
                "recovered",
                {
                    "after": spell(self._first_success - self.failing_since),
                    "failed_attempts": self._failed,
                    "delivered": self._succeeded,
                },
            )
            self.failing_since = self.last_error = self._first_success = None
            return report
        return self._summary(now, waiting=waiting)

    def _summary(self, now: float, *, waiting: int | None = None) -> Report | None:
        assert self.failing_since is not None
        if now - self._last_line < self._summary_every:
            return None
        fields: dict[str, object] = {
            "for": spell(now - self.failing_since),
            "failed_attempts": self._failed_since_line,
            "delivered": self._succeeded_since_line,
            "error": self.last_error,
        }
        if waiting is not None:
            fields["waiting"] = waiting
        self._last_line = now
        self._failed_since_line = self._succeeded_since_line = 0
        return Report("still failing", fields)


def log_report(logger: Any, subject: str, report: Report | None) -> None:
    """Log a report about `subject` ("webhook downstream", "drive alice"), if there is one."""
    if report is None:
        return
    if report.kind == "recovered":
        logger.info(f"{subject} recovered", **report.fields)
    else:
        logger.warning(f"{subject} is {report.kind}", **report.fields)
