"""A throwaway certificate authority for TLS tests (the openssl command line): certificates it signs name
127.0.0.1 and localhost and serve both as servers' and as clients' identities."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path

    def flags(self, ca: Path | None) -> list[str]:
        """A process's TLS flags: this identity, and `ca` for mutual TLS."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key),
                *(["--tls-ca", str(ca)] if ca is not None else [])]


class CertificateAuthority:
    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.folder = folder
        self.cert, self.key = folder / f"{name}.crt", folder / f"{name}.key"
        _openssl("req", "-x509", *EC_KEY, "-days", "1", "-subj", f"/CN=dynamo-grpc test {name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-keyout", str(self.key), "-out", str(self.cert))

    def issue(self, name: str) -> Identity:
        """A certificate for 127.0.0.1 and localhost, good for serving and for calling, and its key."""
        cert, key, request = (self.folder / f"{name}.{suffix}" for suffix in ("crt", "key", "csr"))
        extensions = self.folder / f"{name}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                              "extendedKeyUsage=serverAuth,clientAuth\n")
        _openssl("req", *EC_KEY, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
        _openssl("x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(cert))
        return Identity(cert, key)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)
