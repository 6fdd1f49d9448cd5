"""pydantic's errors as issues a user reads: each at its line in the file, with a suggestion for
a mistyped key, never quoting a value that may be a credential."""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Final, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from relayd.config.errors import ConfigIssue, Invalid, Invalids, Loc, format_loc
from relayd.config.schema import Config

# --------------------------------------------------------------------------- errors -> issues


@dataclass
class Document:
    """Plain data built from the YAML, plus what is needed to report problems in it."""

    data: dict[str, object] = field(default_factory=dict)
    lines: dict[Loc, int] = field(default_factory=dict)
    substituted: set[Loc] = field(default_factory=set)  # values taken from the environment
    # Values that could not be read (failed substitution, bad YAML value): already reported.
    unusable: set[Loc] = field(default_factory=set)
    problems: list[tuple[Loc, int | None, Invalid]] = field(default_factory=list)


# Keys whose values may be credentials: problems there never quote the value.
_SENSITIVE_KEYS: Final = frozenset({"secret", "headers", "token_command", "token_file", "proxy"})
_APPLICATION_CREDENTIAL_KEYS: Final = frozenset(
    {"client_secret", "client_credential", "certificate", "client_certificate", "certificate_path"}
)
_APPLICATION_CREDENTIAL_MESSAGE: Final = (
    "application credentials are not accepted: Graph's socketIo endpoint only accepts "
    "delegated (user) tokens; use client_id for device-code sign-in (relayd login) or "
    "token_command/token_file"
)
_FRIENDLY_MESSAGES: Final = {
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
}
_MISSING: Final = object()


def _lookup(data: object, loc: Loc) -> object:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
            continue
        if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
            continue
        return _MISSING
    return data


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The config model that holds the keys at `loc` (("drives", 0) is a DriveConfig), if any."""
    current: object = Config
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field_info = current.model_fields.get(str(part))
            if field_info is None:
                return None
            current = field_info.annotation
            continue
        # A collection in between: dict[name, Model] takes a key, tuple[Model, ...] an index.
        current = _unwrap(current)
        origin, args = get_origin(current), get_args(current)
        if origin is dict and len(args) == 2:
            current = args[1]
        elif origin is tuple and args:
            current = args[0]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: object) -> object:
    """`Annotated[X, ...]` and `X | None` stand for X here."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(options) == 1:
            return _unwrap(options[0])
    return annotation


def _known_keys(loc: Loc) -> list[str]:
    model = _model_at(loc)
    return [] if model is None else list(model.model_fields)


def _suggestion(key: str, known: Sequence[str]) -> str:
    """ "; did you mean 'webhook'?" for a near miss, else the keys that are allowed there."""
    if not known:
        return ""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of: {', '.join(sorted(known))}"


@dataclass
class Reporter:
    """Turns problems at key paths into ConfigIssues with lines and safe messages."""

    filename: str
    doc: Document

    def line_of(self, loc: Loc) -> int | None:
        # A missing key has no line of its own: use its nearest ancestor that has one.
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.doc.lines:
                return self.doc.lines[loc[:end]]
        return None

    def is_sensitive(self, loc: Loc) -> bool:
        return any(part in _SENSITIVE_KEYS for part in loc) or any(
            loc[:end] in self.doc.substituted for end in range(len(loc) + 1)
        )

    def is_unusable(self, loc: Loc) -> bool:
        return any(loc[:end] in self.doc.unusable for end in range(len(loc) + 1))

    def issue(self, loc: Loc, problem: Invalid, line: int | None = None) -> ConfigIssue:
        # Models turn a single string into a one-element tuple; blame the string, not item 0.
        if (
            loc
            and isinstance(loc[-1], int)
            and not isinstance(_lookup(self.doc.data, loc[:-1]), list)
        ):
            loc = loc[:-1]
        message = problem.redacted if self.is_sensitive(loc) else problem.message
        return ConfigIssue(self.filename, line or self.line_of(loc), format_loc(loc), message)

    def from_validation(self, exc: ValidationError) -> list[ConfigIssue]:
        issues = []
        for error in exc.errors(include_url=False):
            loc = tuple(part for part in error["loc"] if part != "[key]")
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, Invalids):
                problems: Sequence[Invalid] = cause.problems
            elif isinstance(cause, Invalid):
                problems = [cause]
            else:
                problems = [self.pydantic_problem(error["type"], loc, error["msg"], error["input"])]
            for problem in problems:
                where = (*loc, *problem.at)
                # A value that could not be read was reported already; only its key can be wrong.
                if error["type"] == "extra_forbidden" or not self.is_unusable(where):
                    issues.append(self.issue(where, problem))
        return issues

    def pydantic_problem(self, kind: str, loc: Loc, msg: str, value: object) -> Invalid:
        if kind == "extra_forbidden":
            if len(loc) == 3 and loc[0] == "accounts" and loc[2] in _APPLICATION_CREDENTIAL_KEYS:
                return Invalid(_APPLICATION_CREDENTIAL_MESSAGE)
            return Invalid("unknown key" + _suggestion(str(loc[-1]), _known_keys(loc[:-1])))
        if kind == "missing":
            # Present but empty (`url:`) is not the same mistake as a forgotten key.
            return Invalid(
                "a value is required" if loc in self.doc.lines else "missing required key"
            )
        message = _FRIENDLY_MESSAGES.get(kind) or msg
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        # Pydantic's own messages do not quote the input today; make sure it stays that way.
        quotes_value = isinstance(value, str) and bool(value) and value in message
        return Invalid(message, redacted="invalid value" if quotes_value else message)
