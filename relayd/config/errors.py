"""What a configuration problem looks like: the issues a user reads, and the exceptions the
schema's checks raise to produce them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

# A key path inside the document: ("drives", 1, "resource") is drives[1].resource.
Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration file, printed as ``file:line: path: message``."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``issues`` lists every problem found, sorted by line."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        # The same problem can be found twice (e.g. through a YAML alias); report it once.
        unique = list(dict.fromkeys(issues))
        unique.sort(key=lambda issue: issue.line if issue.line is not None else 0)
        self.issues: tuple[ConfigIssue, ...] = tuple(unique)
        # args holds the issues (not the text) so the exception survives pickling.
        super().__init__(self.issues)

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


class Invalid(ValueError):
    """A validation problem with a message fit for users.

    ``message`` may quote the offending value; ``redacted`` never does and is shown instead
    when the value came from the environment or sits under a secret-bearing key. ``at`` is a
    location below the one pydantic reports, for checks that run on a whole model but blame
    one of its keys.
    """

    def __init__(self, message: str, *, redacted: str | None = None, at: Loc = ()) -> None:
        super().__init__(message)
        self.message = message
        self.redacted = message if redacted is None else redacted
        self.at = at


class Invalids(ValueError):
    """Several problems found by one model-level check, each with its own location."""

    def __init__(self, problems: Sequence[Invalid]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{format_loc(p.at)}: {p.redacted}" for p in self.problems))


_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def format_loc(loc: Loc) -> str:
    """("drives", 1, "resource") -> "drives[1].resource"; odd keys are quoted."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f'["{part}"]'
    return text
