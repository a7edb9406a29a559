"""Hosts for tests: one Linux network namespace per host, each with its own address on a private bridge.

`Network` makes the bridge, and per host a namespace with loopback up and a veth pair (one end in the
namespace as `eth0`, with the host's address; the other on the bridge). Only addresses inside the
namespaces exist (10.77.0.0/24 by default); the bridge has none, so nothing outside can reach them and
runs that overlap do not collide: each run names its namespaces, veths and bridge after a random id (and
marks namespaces and bridge with the pid that made them), and `sweep()` removes what runs whose process is
gone left behind. Needs root
(`ip netns`, veth, a bridge); `require_root()` fails with a message that says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

from dynamo_grpc.kv.shm import process_alive

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
PREFIX = "dgns"
"""Every namespace a run makes is called dgns-PID-RUN-HOST; its bridge has the alias `dgns pid=PID`."""
SUBNET = "10.77.0"
"""The first three octets of every host's address: hosts get .2, .3, ... in the order they are added."""


def ip(*args: str, namespace: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`, inside `namespace` when one is given."""
    prefix = [IP, "netns", "exec", namespace, IP] if namespace else [IP]
    result = subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def require_root() -> None:
    """Fail (never skip) where namespaces cannot be made: these tests need root, as CI runs them."""
    if os.geteuid() != 0:
        pytest.fail("network-namespace tests need root (ip netns, veth pairs, a bridge); run them as root",
                    pytrace=False)


def _kill_namespace(namespace: str) -> None:
    """SIGKILL whatever still runs in `namespace`, then delete it (which deletes its veth and the peer)."""
    pids = ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", namespace, check=False)


def sweep() -> list[str]:
    """Remove the namespaces and bridges of runs whose process no longer exists; what was removed."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) >= 4 and parts[0] == PREFIX and parts[1].isdigit() and not process_alive(int(parts[1])):
            _kill_namespace(name)
            removed.append(name)
    for link in json.loads(ip("-j", "link", "show", "type", "bridge").stdout or "[]"):
        alias = link.get("ifalias", "")
        if alias.startswith(f"{PREFIX} pid=") and not process_alive(int(alias.split("=", 1)[1])):
            ip("link", "del", link["ifname"], check=False)
            removed.append(link["ifname"])
    return removed


@dataclass
class Host:
    """One namespace: its address, and the veth end on the bridge that is its link to the others."""

    name: str
    namespace: str
    address: str
    link: str
    """The bridge-side end of the host's veth pair: down, the host is cut off (its `eth0` has no carrier)."""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return [IP, "netns", "exec", self.namespace, *argv]

    def popen(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start `argv` here in a process group of its own, its output into `log_path`; stopped at close."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(self.command(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.processes.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run `argv` here to its end; its exit status and output."""
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout_s, env=env,
                              check=False)

    def link_down(self) -> None:
        ip("link", "set", self.link, "down")

    def link_up(self) -> None:
        ip("link", "set", self.link, "up")

    def stop_processes(self) -> None:
        """SIGTERM each process group started here, SIGKILL those still running after 10 s."""
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


class Network:
    """A bridge and the hosts on it; `close()` (or leaving the `with`) removes all of it, processes first."""

    def __init__(self, subnet: str = SUBNET) -> None:
        require_root()
        sweep()
        self.subnet = subnet
        self.run_id = secrets.token_hex(3)
        self.bridge = f"dgb{self.run_id}"
        self.hosts: dict[str, Host] = {}
        ip("link", "add", self.bridge, "type", "bridge")
        try:
            ip("link", "set", self.bridge, "alias", f"{PREFIX} pid={os.getpid()}")
            ip("link", "set", self.bridge, "up")
        except BaseException:
            ip("link", "del", self.bridge, check=False)
            raise

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge, with the next free address."""
        index = len(self.hosts)
        namespace = f"{PREFIX}-{os.getpid()}-{self.run_id}-{name}"
        host = Host(name, namespace, f"{self.subnet}.{index + 2}", f"dgv{self.run_id}{index}")
        self.hosts[name] = host
        ip("netns", "add", namespace)
        peer = f"dgp{self.run_id}{index}"
        ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", namespace)
        ip("link", "set", peer, "name", "eth0", namespace=namespace)
        ip("addr", "add", f"{host.address}/24", "dev", "eth0", namespace=namespace)
        ip("link", "set", "lo", "up", namespace=namespace)
        ip("link", "set", "eth0", "up", namespace=namespace)
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop_processes()
        for host in self.hosts.values():
            _kill_namespace(host.namespace)
        ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
