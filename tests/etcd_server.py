"""A real single-member etcd for tests, on free loopback ports, in its own process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.throwaway_ca import ThrowawayCA

ETCD_BINARY = os.environ.get("ETCD_BINARY") or shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """Start/stop/kill/restart an etcd; restart keeps ports and data dir, like a real node reboot.

    With `ca`, clients reach it over TLS with a certificate that CA signs; `client_cert_auth` also makes
    it require a client certificate from that CA. `auth_token_ttl_s` sets how long an idle auth token
    lives (etcd's default: 300 s). Authentication itself is switched on through etcd's API, as in use."""

    def __init__(self, base_dir: Path | None = None, name: str = "test-etcd", *,
                 ca: ThrowawayCA | None = None, client_cert_auth: bool = False,
                 auth_token_ttl_s: int | None = None) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="etcd-")) if base_dir is None else base_dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.ca = ca
        self.client_cert_auth = client_cert_auth
        self.auth_token_ttl_s = auth_token_ttl_s
        self._server_cert = ca.server(f"{name}-server") if ca is not None else None
        self._health_cert = ca.client("root") if ca is not None and client_cert_auth else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def scheme(self) -> str:
        return "http" if self.ca is None else "https"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        client_url, peer_url = f"{self.scheme}://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        command = [
            ETCD_BINARY, "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}", "--name", self.name,
            *self._security_flags(),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM to the whole group), escalating to SIGKILL if it hangs."""
        if self._proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    def kill(self) -> None:
        """Crash it: SIGKILL the whole group."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no etcd log)"

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def _security_flags(self) -> list[str]:
        flags = []
        if self._server_cert is not None:
            assert self.ca is not None
            cert, key = self._server_cert
            flags += ["--cert-file", str(cert), "--key-file", str(key)]
            if self.client_cert_auth:  # etcd asks every client for a certificate once it has a CA to check
                flags += ["--client-cert-auth", "--trusted-ca-file", str(self.ca.ca_path)]
        if self.auth_token_ttl_s is not None:
            flags += ["--auth-token-ttl", str(self.auth_token_ttl_s)]
        return flags

    def _health_context(self) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        context = ssl.create_default_context(cafile=str(self.ca.ca_path))
        if self._health_cert is not None:
            context.load_cert_chain(*self._health_cert)
        return context

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                last_error = f"etcd exited with code {self._proc.returncode}"
                break
            try:
                with urllib.request.urlopen(f"{self.scheme}://{self.endpoint}/health", timeout=1.0,
                                            context=self._health_context()) as response:
                    if json.loads(response.read()).get("health") == "true":
                        return
                    last_error = "health is not true yet"
            except (OSError, ValueError) as exc:
                last_error = str(exc)
            time.sleep(0.05)
        tail = self.log_tail()
        print(f"etcd failed to start ({last_error}); log tail:\n{tail}")
        raise RuntimeError(f"etcd on {self.endpoint} did not become healthy: {last_error}\n{tail}")
