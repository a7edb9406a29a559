"""TLS, mutual TLS and bearer tokens: one definition for every gRPC server, every channel between our
processes, the Python client and the HTTP frontend.

A process's `Tls` is both sides of its identity: as a server it presents `certificate_chain` and, given
`root_certificates`, requires every caller to present a certificate that CA signed (mutual TLS); as a client
it trusts that CA and presents the same certificate. Without `Tls` everything is plaintext, as on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

PemSource = bytes | str | Path
"""PEM text as bytes, or the path of a file holding it."""


@dataclass(frozen=True)
class Tls:
    """TLS settings. Without `root_certificates` a client trusts the system's roots and a server asks no
    client certificate; with them a client trusts that CA and a server requires client certificates it
    signed. A certificate chain and its private key are a server's identity, and make a client's TLS mutual.
    `server_name` is the name the server's certificate must carry when it is not the endpoint's host."""

    root_certificates: PemSource | None = None
    certificate_chain: PemSource | None = None
    private_key: PemSource | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TLS needs both a certificate chain and its private key, or neither")

    @property
    def mutual(self) -> bool:
        """Whether a server with these settings requires client certificates."""
        return self.root_certificates is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.root_certificates),
                                            private_key=_pem(self.private_key),
                                            certificate_chain=_pem(self.certificate_chain))

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.certificate_chain is None:
            raise ValueError("a TLS server needs a certificate chain and its private key")
        return grpc.ssl_server_credentials([(_pem(self.private_key), _pem(self.certificate_chain))],
                                           root_certificates=_pem(self.root_certificates),
                                           require_client_auth=self.mutual)

    def http_context(self) -> ssl.SSLContext:
        """An HTTPS server's context: its certificate only (HTTP clients authenticate by bearer token).
        `ssl` reads certificates from files, so here they are paths."""
        if isinstance(self.certificate_chain, bytes) or isinstance(self.private_key, bytes):
            raise ValueError("an HTTPS server takes its certificate and key as file paths")
        if self.certificate_chain is None:
            raise ValueError("an HTTPS server needs a certificate chain and its private key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certificate_chain, self.private_key)
        return context

    def channel_options(self) -> tuple[tuple[str, Any], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()


def open_channel(endpoint: str, tls: Tls | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A channel to `endpoint`: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(endpoint, options=tuple(options))
    return grpc.aio.secure_channel(endpoint, tls.credentials(), options=(*options, *tls.channel_options()))


def listen(server: grpc.aio.Server, host: str, port: int, tls: Tls | None) -> int:
    """Bind `server` to host:port, with TLS when given; the port bound (0: could not). A plaintext port
    beyond loopback gets a warning: anyone who reaches it can call it."""
    address = f"{host}:{port}"
    if tls is not None:
        return server.add_secure_port(address, tls.server_credentials())
    bound = server.add_insecure_port(address)
    if bound and not is_loopback(host):
        log.warning("gRPC on %s:%d is plaintext and open to anyone who reaches it; give --tls-cert, --tls-key "
                    "and --tls-ca for mutual TLS", host, bound)
    return bound


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or every address (0.0.0.0, ::, "")


def bearer_matches(authorization: str | None, token: bytes) -> bool:
    """Whether an `authorization` value is `Bearer <token>`; compared in constant time."""
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def read_token(path: str, flag: str) -> str:
    """The token in file `path` (surrounding whitespace dropped); ValueError naming `flag` when unreadable
    or empty."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag} {path}: {getattr(error, 'strerror', None) or error}") from None
    if not token:
        raise ValueError(f"{flag} {path}: the file holds no token")
    return token


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()
