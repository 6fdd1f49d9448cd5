"""Logging: structlog JSON lines (journald, containers) or a console format, with redaction.

Code never passes secrets to a log call on purpose. Redaction is the second line of defence for
what slips through anyway, such as a library's exception text that quotes a URL: the query values
that carry credentials, bearer tokens, JWTs and webhook secrets are masked in every line, ours and
the standard library's.

Every line is one record: structlog's own, and the standard library's, whichever library logged
it (python-engineio's tracebacks included), rendered by the one handler on the root logger as a
JSON object per line, or a console line with its line breaks escaped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

_PATTERNS = (
    # notificationUrl credentials and OAuth bits in query strings
    (
        re.compile(
            r"([?&](?:token|snthgk|access_token|refresh_token|code|sig|key)=)[^&\s\"'<>]+",
            re.IGNORECASE,
        ),
        r"\1***",
    ),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1***"),
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "***jwt***"),
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), "whsec_***"),
    # user:password in a URL (a proxy's, mostly: http://user:pass@proxy:3128)
    (re.compile(r"(://)[^/\s:@\"'<>]+:[^/\s@\"'<>]*@"), r"\1***@"),
)


def redact(text: str) -> str:
    """Mask credentials in a string; pure."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# RFC 6750's b64token alphabet: what a bearer token is made of, and what an Authorization header
# carries without escaping. Also the alphabet of base64, base64url and JWTs, i.e. of every token
# and refresh token format in use.
TOKEN_ALPHABET = r"A-Za-z0-9._~+/=-"
# A long word of that alphabet is treated as a secret whatever its shape: opaque refresh tokens
# (e.g. "0.AXYA...", "M.C5..."), JWTs, client secrets, base64 blobs. This also masks some
# harmless long words (paths, host names): the price of not guessing.
_TOKEN_LIKE = re.compile(f"[{TOKEN_ALPHABET}]{{16,}}")
REDACTED = "[redacted]"


def mask_opaque(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every given secret and every long token-like word masked; pure.

    Stricter than `redact`, for text that may hold secrets of any shape (what a token source
    printed). Secrets go first: a short one (under 16 characters) is caught by its value only.
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _TOKEN_LIKE.sub(REDACTED, text)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact(value)
    if depth < 4 and isinstance(value, list | tuple):  # e.g. config errors, one per line
        return [_redact_value(item, depth + 1) for item in value]
    if depth < 4 and isinstance(value, dict):
        return {key: _redact_value(item, depth + 1) for key, item in value.items()}
    return value


def _redact_event(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _redact_value(value)
    return event


@dataclass
class _Settings:
    """What the last configure() asked for. Loggers bound before it (every drive's, every
    webhook's) read these at each call, so a reload's new level or format reaches them too."""

    level: int = logging.INFO
    render: Callable[[Any, str, MutableMapping[str, Any]], Any] = field(
        default_factory=structlog.processors.JSONRenderer
    )
    stream: TextIO | None = None  # None: whatever sys.stderr is at each line


_settings = _Settings()


class _LineWriter:
    """A structlog logger writing each line to the configured stream, or to whatever sys.stderr
    is *now* (a test runner or a daemoniser may swap it after logging was set up)."""

    def msg(self, message: str) -> None:
        stream = _settings.stream or sys.stderr
        stream.write(message + "\n")
        stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    return _settings.render(logger, method, event)


class _BoundLogger(structlog.BoundLoggerBase):
    """structlog's filtering logger, but against the level in force now rather than the one at
    bind time; a call below it costs one comparison."""

    def _at(
        self, level: int, method: str, event: str | None, args: tuple[Any, ...], kw: Any
    ) -> Any:
        if level < _settings.level:
            return None
        if args and isinstance(event, str):
            event = event % args
        return self._proxy_to_logger(method, event, **kw)

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.DEBUG, "debug", event, args, kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.INFO, "info", event, args, kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.WARNING, "warning", event, args, kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.ERROR, "error", event, args, kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._at(logging.ERROR, "error", event, args, kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.CRITICAL, "critical", event, args, kw)


class _RedactingHandler(logging.Handler):
    """Every standard-library record in the process (aiohttp, asyncio, python-engineio, ...),
    redacted, as one line in the configured format, to the same stream as structlog's lines."""

    def __init__(self, stream: TextIO | None, fmt: str) -> None:
        super().__init__()
        self._stream = stream
        self._fmt = fmt

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = format_record(record, self._fmt)
        except Exception as exc:  # a record whose message cannot be built (bad %-args)
            line = format_fields(_unformattable(record, exc), self._fmt)
        try:
            stream = self._stream or sys.stderr
            stream.write(line + "\n")  # one write per line: lines from both sources never mix
            stream.flush()
        except Exception:
            self.handleError(record)


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """A standard-library record as the fields of one of structlog's lines, redacted; pure."""
    fields = {
        "event": record.getMessage(),
        "logger": record.name,
        "level": record.levelname.lower(),
        "timestamp": _timestamp(record.created),
    }
    if record.exc_info and record.exc_info[0] is not None:
        fields["exception"] = _EXCEPTION_FORMATTER.formatException(record.exc_info)
    elif record.exc_text:
        fields["exception"] = record.exc_text
    if record.stack_info:
        fields["stack"] = record.stack_info
    return {key: redact(value) for key, value in fields.items()}


def format_fields(fields: Mapping[str, str], fmt: str) -> str:
    """One line: a JSON object (`json`), or text with line breaks escaped (`console`); pure."""
    if fmt == "json":
        return json.dumps(fields)  # ensure_ascii: every line break inside is escaped too
    head = (
        f"{fields['timestamp']} [{fields['level']:<9}] {fields['event']} logger={fields['logger']}"
    )
    tail = "".join(f" {key}={fields[key]}" for key in ("exception", "stack") if key in fields)
    return _escape_line_breaks(head + tail)


def format_record(record: logging.LogRecord, fmt: str) -> str:
    return format_fields(record_fields(record), fmt)


def _unformattable(record: logging.LogRecord, error: Exception) -> dict[str, str]:
    return {
        "event": redact(f"unformattable log record: {record.msg!r} ({type(error).__name__})"),
        "logger": record.name,
        "level": record.levelname.lower(),
        "timestamp": _timestamp(record.created),
    }


def _timestamp(created: float) -> str:
    """The same form as structlog's TimeStamper(fmt="iso", utc=True)."""
    return datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")


_EXCEPTION_FORMATTER = logging.Formatter()

# Everything str.splitlines() would split on (journald and `grep` split on fewer), escaped.
_LINE_BREAKS = {
    code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, 0x85) if chr(code) != "\t"
} | {ord("\n"): "\\n", ord("\r"): "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _escape_line_breaks(text: str) -> str:
    return text.translate(_LINE_BREAKS)


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog and the standard library's logging for the whole process; called again
    (a reload), it applies to every logger at once, also those bound before."""
    numeric = logging.getLevelName(level.upper())
    _settings.level = numeric
    _settings.stream = stream
    if fmt == "console":
        _settings.render = structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    else:
        _settings.render = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            _render,
        ],
        wrapper_class=_BoundLogger,
        logger_factory=lambda *_: _LineWriter(),
        cache_logger_on_first_use=False,
    )
    _route_every_record_to(_RedactingHandler(stream, fmt), max(numeric, logging.WARNING))


# python-engineio and python-socketio give the default logger of each client and server they
# build (`engineio.client`, `socketio.server`, ...) a StreamHandler of their own when that logger's
# level is still NOTSET: a second copy of every record, raw (unredacted) and over as many lines as
# its traceback. A level of our own on those loggers means that branch never runs. ERROR, because
# at INFO engineio logs every packet and the connection URL with its credential query.
_LIBRARY_LEVELS = {
    "engineio": logging.ERROR,
    "socketio": logging.ERROR,
    "engineio.client": logging.ERROR,
    "engineio.server": logging.ERROR,
    "socketio.client": logging.ERROR,
    "socketio.server": logging.ERROR,
}


def _route_every_record_to(handler: logging.Handler, level: int) -> None:
    """Make `handler`, on the root logger, the only one any record in the process reaches."""
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, library_level in _LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(library_level)
    # Whatever any library attached before now (or since the last configure) goes, and every
    # logger passes its records up to the root: one handler, one format, redacted.
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()
            logger.propagate = True
    # warnings.warn() prints to stderr itself, over two lines; as a record it is one line too.
    logging.captureWarnings(True)
