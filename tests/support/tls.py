"""A self-signed certificate for 127.0.0.1/localhost, for the test servers that speak TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support.tcp_relay import LoopbackServer


@lru_cache(maxsize=1)
def self_signed() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM); one per process (RSA keygen is slow-ish)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_cert(directory: Path) -> tuple[Path, Path]:
    """cert.pem and key.pem in `directory`; the certificate is also its own CA."""
    cert_pem, key_pem = self_signed()
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key_pem)
    return directory / "cert.pem", directory / "key.pem"


def server_tls_context(directory: Path) -> ssl.SSLContext:
    """Write cert.pem/key.pem into `directory` and load them into a server context."""
    cert, key = write_cert(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class CorruptingTlsFront(LoopbackServer):
    """HTTPS in front of a plain-HTTP server on loopback (certificate: `server_tls_context`).
    Each request is forwarded whole and its answer relayed, except that the first `corrupt`
    answers are replaced by a TLS record nobody can decrypt: the server did the work, and the
    client's TLS layer fails while reading what came back."""

    def __init__(self, upstream_port: int, directory: Path, corrupt: int = 1) -> None:
        self.upstream_port = upstream_port
        self.corrupt = corrupt
        self.cert = directory / "cert.pem"
        self._context = server_tls_context(directory)
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        raw = socket.socket(fileno=os.dup(client.fileno()))  # under the TLS layer
        try:
            with self._context.wrap_socket(client, server_side=True) as tls, \
                    socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                from_client, from_upstream = tls.makefile("rb"), upstream.makefile("rb")
                while request := _http_message(from_client):
                    upstream.sendall(request)
                    answer = _http_message(from_upstream)
                    if self.corrupt > 0:
                        self.corrupt -= 1
                        raw.sendall(b"\x17\x03\x03\x00\x40" + os.urandom(64))
                        return
                    tls.sendall(answer)
        except OSError:
            pass
        finally:
            raw.close()


def _http_message(stream: BinaryIO) -> bytes:
    """One HTTP/1.1 request or response with a Content-Length body; b"" at end of stream."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = stream.readline()
        if not line:
            return b""
        head += line
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + stream.read(length)
