"""relayd: relay Microsoft Graph drive change notifications to webhooks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("relayd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
