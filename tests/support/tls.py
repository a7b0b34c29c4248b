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


@dataclass(frozen=True)
class BrokenTLSFiles:
    """Files a ``dial.tls`` setting must refuse, each kind of way (see ``broken_tls_files``)."""

    missing: str  # no such file
    directory: str  # a directory, not a file
    not_pem: str  # plain text
    der: str  # the test CA's certificate in DER: a certificate, but not PEM
    garbled: str  # a PEM certificate block whose body is not base64 DER
    other_key: str  # a PEM private key of another certificate: matches no cert we have
    encrypted_key: str  # the client certificate's own key, passphrase-protected


def broken_tls_files(root: str, certs: TLSCerts) -> BrokenTLSFiles:
    """Write the files of ``BrokenTLSFiles`` under ``root`` (a directory that exists)."""
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization

    base = Path(root)

    def write(name: str, data: bytes) -> str:
        path = base / name
        path.write_bytes(data)
        return str(path)

    (base / "a-directory.pem").mkdir()
    client_key = serialization.load_pem_private_key(
        Path(certs.client_key_file).read_bytes(), password=None
    )
    encrypted = client_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    return BrokenTLSFiles(
        missing=str(base / "missing.pem"),
        directory=str(base / "a-directory.pem"),
        not_pem=write("not-pem.pem", b"this is not a certificate\n"),
        der=write("ca.der", ssl.PEM_cert_to_DER_cert(certs.ca.cert_pem.bytes().decode())),
        garbled=write(
            "garbled.pem",
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        ),
        other_key=write("other.key", trustme.CA().issue_cert("other.test").private_key_pem.bytes()),
        encrypted_key=write("encrypted.key", encrypted),
    )
