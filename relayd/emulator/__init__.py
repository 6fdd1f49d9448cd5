"""Stand-ins for the outside world: a fake Microsoft Graph and a webhook receiver.

The test-suite and `relayd demo` run a relay against these instead of the real service.

The names are loaded on first use rather than imported here, so that
`python -m relayd.emulator.graph` does not find its own module already imported by this package
(runpy warns about that, and the module would run twice).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relayd.emulator.graph import GraphEmulator
    from relayd.emulator.receiver import ReceivedRequest, ScriptedResponse, WebhookReceiver

__all__ = ["GraphEmulator", "ReceivedRequest", "ScriptedResponse", "WebhookReceiver"]

_HOMES = {
    "GraphEmulator": "relayd.emulator.graph",
    "ReceivedRequest": "relayd.emulator.receiver",
    "ScriptedResponse": "relayd.emulator.receiver",
    "WebhookReceiver": "relayd.emulator.receiver",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
