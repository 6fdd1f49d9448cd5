"""A throwaway certificate authority for the emulator: HTTPS and WSS the way production runs.

`throwaway_ca()` issues a server certificate for the loopback names tests use (127.0.0.1,
127.0.0.2, localhost, ::1) from a CA made on the spot with `trustme` (a dev dependency: the daemon
never needs it). Its `server_context` goes to `GraphEmulator(ssl_context=...)` or
`WebhookReceiver(ssl_context=...)`; its CA, written with `write_ca`, is what `tls.ca_file` (or
SSL_CERT_FILE) points relayd at. Nothing is ever trusted system-wide.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LOOPBACK_NAMES", "ThrowawayCA", "throwaway_ca"]

LOOPBACK_NAMES = ("127.0.0.1", "127.0.0.2", "localhost", "::1")


@dataclass(frozen=True)
class ThrowawayCA:
    ca_pem: bytes
    server_context: ssl.SSLContext
    _ca: Any  # the trustme.CA, to issue more certificates

    def write_ca(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to `path`; returns it."""
        path.write_bytes(self.ca_pem)
        return path

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting this CA only: for a test that talks TLS itself."""
        context = ssl.create_default_context()
        self._ca.configure_trust(context)
        return context


def throwaway_ca(names: Sequence[str] = LOOPBACK_NAMES) -> ThrowawayCA:
    """A new CA and a server context whose certificate it issued for `names`."""
    try:
        import trustme
    except ImportError:  # pragma: no cover - the dev extras bring it
        raise RuntimeError("emulator TLS needs trustme: pip install 'relayd[dev]'") from None
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(server)
    return ThrowawayCA(ca.cert_pem.bytes(), server, ca)
