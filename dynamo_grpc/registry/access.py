"""How a process proves itself to etcd: TLS (the CA that signed etcd's certificate, and optionally a client
certificate for etcd's --client-cert-auth) and/or an etcd user's password."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PASSWORD_ENV = "DYNAMO_GRPC_ETCD_PASSWORD"


class EtcdAccessError(ValueError):
    """Settings that cannot work (a missing file, a key without its certificate); the message says which."""


@dataclass(frozen=True)
class EtcdAccess:
    """TLS files (paths) and credentials for etcd; empty: plain TCP, no authentication."""

    ca: str = ""
    """The CA certificate (PEM) that signed etcd's server certificate; set, the connection uses TLS."""
    cert: str = ""
    """This process's client certificate (PEM), for an etcd started with --client-cert-auth."""
    key: str = ""
    """The client certificate's private key (PEM)."""
    user: str = ""
    """An etcd user; its roles decide which keys this process may read and write."""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise EtcdAccessError("--etcd-cert and --etcd-key go together: pass both or neither")
        if self.cert and not self.ca:
            raise EtcdAccessError("--etcd-cert needs --etcd-ca (the CA that signed etcd's certificate)")
        if self.user and not self.password:
            raise EtcdAccessError(f"--etcd-user {self.user} needs its password: --etcd-password-file PATH "
                                  f"or the {PASSWORD_ENV} environment variable")
        if self.password and not self.user:
            raise EtcdAccessError("an etcd password was given without --etcd-user")
        for flag, path in (("--etcd-ca", self.ca), ("--etcd-cert", self.cert), ("--etcd-key", self.key)):
            if path and not os.access(path, os.R_OK):
                raise EtcdAccessError(f"{flag} {path}: no such readable file")

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    def channel_credentials(self) -> dict[str, bytes]:
        """etcd3aio's TLS arguments (`ca_cert`, `cert_chain`, `cert_key`): the PEM files' bytes."""
        files = {"ca_cert": self.ca, "cert_chain": self.cert, "cert_key": self.key}
        return {name: Path(path).read_bytes() for name, path in files.items() if path}

    def environment(self) -> dict[str, str]:
        """These settings as the DYNAMO_GRPC_ETCD_* variables a child process reads its etcd flags' defaults
        from, so the password stays off every command line."""
        values = {"DYNAMO_GRPC_ETCD_CA": self.ca, "DYNAMO_GRPC_ETCD_CERT": self.cert,
                  "DYNAMO_GRPC_ETCD_KEY": self.key, "DYNAMO_GRPC_ETCD_USER": self.user,
                  PASSWORD_ENV: self.password}
        return {name: value for name, value in values.items() if value}


def read_password(path: str) -> str:
    """A password file's first line (a trailing newline is not part of the password)."""
    try:
        return Path(path).read_text().splitlines()[0] if Path(path).stat().st_size else ""
    except OSError as error:
        raise EtcdAccessError(f"--etcd-password-file {path}: {error.strerror or error}") from None
