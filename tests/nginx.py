"""Debian's nginx in front of a live router, configured by the example in docs/mesh/nginx.conf (TLS on the
client side), and the certificates it presents and trusts. The fixtures using these are in conftest.py."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from pathlib import Path

from tests.processes import REPO

NGINX = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
EXAMPLE = REPO / "docs" / "mesh" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def self_signed_certificate(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (openssl)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def access_checks(token: str | None, client_ca: Path | None) -> tuple[str, str]:
    """nginx lines (server level, then inside `location /`) that refuse a call without the client
    certificate `client_ca` signed or without `authorization: Bearer <token>`, each with a gRPC status."""
    server, location = [], []
    if client_ca is not None:
        server += [f"ssl_client_certificate {client_ca};", "ssl_verify_client optional;"]
        location.append("if ($ssl_client_verify != SUCCESS) { return 403; }")
    if token is not None:
        location.append(f'if ($http_authorization != "Bearer {token}") {{ return 401; }}')
    if location:  # error_page here: the location's own error_page hides the server's
        location += ["error_page 401 = @unauthenticated;", "error_page 403 = @no_client_certificate;"]
        server += [*refusal("unauthenticated", 16, "a valid bearer token is required"),
                   *refusal("no_client_certificate", 16, "a client certificate is required")]
    return "\n    ".join(server), "\n        ".join(location)


def refusal(name: str, status: int, message: str) -> list[str]:
    return [f"location @{name} {{", "    default_type application/grpc;",
            f"    add_header grpc-status {status} always;", f'    add_header grpc-message "{message}" always;',
            "    return 204;", "}"]


def nginx_config(folder: Path, *, port: int, router: str, cert: Path, key: Path, token: str | None = None,
                 client_ca: Path | None = None) -> Path:
    """The documented server block with this test's ports and certificate (and, when given, the access
    checks of `access_checks`), inside a main config that runs nginx in the foreground with every path in
    `folder`."""
    example = EXAMPLE.read_text()
    replacements = [("listen 8443", f"listen 127.0.0.1:{port}"), ("server 127.0.0.1:50051", f"server {router}"),
                    ("/etc/dynamo-grpc/tls/server.crt", str(cert)), ("/etc/dynamo-grpc/tls/server.key", str(key))]
    if token is not None or client_ca is not None:
        server_lines, location_lines = access_checks(token, client_ca)
        replacements.append(("    location / {", f"    {server_lines}\n    location / {{\n        {location_lines}"))
    for documented, ours in replacements:
        assert example.count(documented) == 1, f"{EXAMPLE} no longer has {documented!r} once"
        example = example.replace(documented, ours)
    (folder / "dynamo-grpc.conf").write_text(example)
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in TEMP_PATHS)
    main = folder / "nginx.conf"
    main.write_text(f"""user {getpass.getuser()};
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {folder / "access.log"};
{temp}
    include {folder / "dynamo-grpc.conf"};
}}
""")
    return main
