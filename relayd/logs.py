"""Logging: structlog JSON lines (journald, containers) or a console format, with redaction.

Code never passes secrets to a log call on purpose. Redaction is the second line of defence for
what slips through anyway, such as a library's exception text that quotes a URL: the query values
that carry credentials, bearer tokens, JWTs and webhook secrets are masked in every line, ours and
the standard library's.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
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
)


def redact(text: str) -> str:
    """Mask credentials in a string; pure."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_event(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


class _LineWriter:
    """A structlog logger writing each line to a stream, or to whatever sys.stderr is *now*
    (a test runner or a daemoniser may swap it after logging was set up)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(message + "\n")
        stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _RedactingHandler(logging.Handler):
    """The standard library's records (aiohttp, asyncio), redacted, to the same stream."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._stream = stream
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self._stream or sys.stderr
            stream.write(redact(self.format(record)) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog and the standard library's logging for the whole process."""
    numeric = logging.getLevelName(level.upper())
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _LineWriter(stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [_RedactingHandler(stream)]
    root.setLevel(max(numeric, logging.WARNING))
    # engineio logs connection URLs (with the credential query) at INFO: keep it to errors.
    for name in ("engineio", "socketio"):
        logging.getLogger(name).setLevel(logging.ERROR)
