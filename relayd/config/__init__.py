"""Load and validate relayd's YAML configuration.

Everything that reads the configuration (the daemon at start-up and on live reload, ``relayd
login``, config checks) goes through :func:`load_config`. It returns frozen pydantic models, so
two loads of an unchanged file compare equal and a reload can diff ``old != new``.

The error messages are part of the user interface: every problem found in the file is reported
at once, each as ``file:line: key.path: message`` (see :class:`ConfigIssue`). To get line numbers
the YAML is composed into a node tree first, turned into plain data while remembering the line of
every key, and only then validated; pydantic's error locations are mapped back to those lines.

Values may come from the environment (``${VAR}``, ``${VAR:-default}``, ``$$`` for a literal
``$``). Such values, and anything under a secret-bearing key, are never quoted in an error
message or in a model's repr: they may be credentials.

The package: `schema` (the frozen models, their field types and checks: pure), `reader` (YAML to
data with every key's line, `${VAR}` expansion, the entry points), `report` (pydantic's errors as
those issues) and `errors` (the issue and exception types all three share).
"""

from __future__ import annotations

from relayd.config.errors import ConfigError, ConfigIssue
from relayd.config.reader import load_config, parse_config
from relayd.config.schema import (
    AccountConfig,
    AdminConfig,
    Config,
    DriveConfig,
    GraphConfig,
    LogConfig,
    OutboxConfig,
    RetryConfig,
    TlsConfig,
    WebhookConfig,
    drive_address,
    is_name,
    needs_lookup,
    parse_duration,
    resource_path,
)

__all__ = [
    "AccountConfig",
    "AdminConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DriveConfig",
    "GraphConfig",
    "LogConfig",
    "OutboxConfig",
    "RetryConfig",
    "TlsConfig",
    "WebhookConfig",
    "drive_address",
    "is_name",
    "load_config",
    "needs_lookup",
    "parse_config",
    "parse_duration",
    "resource_path",
]
