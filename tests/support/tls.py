"""A test CA with server and client certificates (trustme), as files and contexts."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import trustme


@dataclass(frozen=True)
class TLSCerts:
    """A test CA, a server certificate and a client certificate, as files and objects."""

    ca: trustme.CA
    ca_file: str  # PEM of the CA that signed both certificates
    server: trustme.LeafCert  # for 127.0.0.1, ::1 and localhost
    client_cert_file: str
    client_key_file: str
    other_ca_file: str  # a CA that signed nothing we serve: verification must fail

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """A server-side context presenting ``server``; optionally demanding a client cert."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A gevent client context trusting the test CA (for raw client sockets)."""
        from gevent import ssl as gssl

        ctx: ssl.SSLContext = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        return ctx
