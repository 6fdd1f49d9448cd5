"""TLS for tests: a throwaway CA per test, its PEM file, and the emulator and receiver over TLS.

The CA is made by `trustme` (relayd.emulator.tls) and trusted by nothing but what a test points
at its file (`tls.ca_file`, or SSL_CERT_FILE for a child process). Import the fixtures into a
test module (`from support.tls import ca, tls_emulator, tls_receiver`) to use them.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relayd.emulator import GraphEmulator, WebhookReceiver
from relayd.emulator.tls import ThrowawayCA, throwaway_ca
from support.configs import TOKEN

__all__ = ["Authority", "ca", "tls_emulator", "tls_receiver"]


@dataclass(frozen=True)
class Authority:
    issuer: ThrowawayCA
    ca_file: Path  # the CA certificate, PEM: what tls.ca_file names

    @property
    def server_context(self) -> ssl.SSLContext:
        return self.issuer.server_context


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    """A CA made for this test, its certificate in tmp_path/test-ca.pem."""
    issuer = throwaway_ca()
    return Authority(issuer, issuer.write_ca(tmp_path / "test-ca.pem"))


@pytest.fixture
async def tls_emulator(ca: Authority) -> AsyncIterator[GraphEmulator]:
    """The Graph emulator on https:// and wss://, its certificate issued by `ca`."""
    async with GraphEmulator(tokens=[TOKEN], ssl_context=ca.server_context) as graph:
        yield graph


@pytest.fixture
async def tls_receiver(ca: Authority) -> AsyncIterator[WebhookReceiver]:
    """A webhook receiver on https://, its certificate issued by `ca`."""
    async with WebhookReceiver(ssl_context=ca.server_context) as hooks:
        yield hooks
