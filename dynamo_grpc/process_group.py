"""Several processes serving one port: `frontend --workers N` and `router --workers N`.

One Python process runs on one core at a time, and the HTTP frontend and the router spend their CPU in
Python. N processes that each listen on the same port with SO_REUSEPORT let the kernel spread incoming
connections over them, and each follows the registry with a fleet view of its own (routers already count
each other's requests through the workers' load reports). A parent starts them, forwards SIGINT and SIGTERM,
waits for them to stop, and, when one dies unexpectedly, stops the others, so a supervisor (`up`) restarts
the whole group.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from dynamo_grpc.engine import cpu_cores

log = logging.getLogger(__name__)

GROUP_INDEX_ENV = "DYNAMO_GRPC_GROUP_INDEX"
"""Set in a group's processes (0..N-1): they listen with SO_REUSEPORT on the port the parent holds."""
GROUP_METRICS_ENV = "DYNAMO_GRPC_GROUP_METRICS_PORTS"
"""Set in a group's processes: the loopback port on which each (by index) serves its own series, so that
whichever process a scrape of the shared port reaches answers for the whole group."""

STOP_TIMEOUT_S = 30.0


def workers_count(text: str) -> int:
    """`--workers` as argparse reads it: a count, with 0 or `auto` meaning one per usable core."""
    if text.strip().lower() == "auto":
        return 0
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or 'auto', got {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more processes (0: one per core), got {count}")
    return count


def resolve(count: int) -> int:
    """The number of processes to run: `count`, or one per usable core for 0."""
    return count or len(cpu_cores.usable())


def index() -> int:
    """This process's place in its group (0 outside a group)."""
    return int(os.environ.get(GROUP_INDEX_ENV, "0"))


def metrics_ports() -> list[int]:
    """The group's private metrics ports, by process index (none outside a group)."""
    return [int(port) for port in os.environ.get(GROUP_METRICS_ENV, "").split(",") if port]


def free_loopback_ports(count: int) -> list[int]:
    """`count` ports free on 127.0.0.1 now (the kernel's picks)."""
    holders = [socket.socket() for _ in range(count)]
    try:
        for holder in holders:
            holder.bind(("127.0.0.1", 0))
        return [holder.getsockname()[1] for holder in holders]
    finally:
        for holder in holders:
            holder.close()


def in_group() -> bool:
    """Whether this process is one of a group sharing its port (it must then listen with SO_REUSEPORT)."""
    return GROUP_INDEX_ENV in os.environ


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: a free port) with SO_REUSEPORT but not listening: it keeps the port
    for the group (no connection ever reaches it), and the group's processes join it on the same port."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
    except OSError:
        holder.close()
        raise
    return holder


class ProcessGroup:
    """N copies of one command, each told its index, stopped together."""

    def __init__(self, argv: Sequence[str], count: int, *, name: str, first_index: int = 0,
                 metrics_ports: Sequence[int] = ()) -> None:
        """Children take indices from `first_index` (a parent that serves beside them is 0); `metrics_ports`
        are the whole group's private metrics ports (default: one free port per child)."""
        self.argv, self.count, self.name, self.first_index = list(argv), count, name, first_index
        self.metrics_ports = list(metrics_ports) or free_loopback_ports(count)
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.failure = 0

    def start(self) -> None:
        for index in range(self.count):
            env = {**os.environ, GROUP_INDEX_ENV: str(self.first_index + index),
                   GROUP_METRICS_ENV: ",".join(map(str, self.metrics_ports))}
            self.children.append(subprocess.Popen(self.argv, env=env))
        pids = " ".join(str(child.pid) for child in self.children)
        log.info("%s: %d processes (pids %s)", self.name, self.count, pids)

    def signal_all(self, sig: int) -> None:
        for child in self.children:
            if child.poll() is None:
                try:
                    child.send_signal(sig)
                except ProcessLookupError:
                    pass

    def on_signal(self, sig: int, _frame: object) -> None:
        """Pass a stop signal on; the children stop, then `wait` returns."""
        self.stopping = True
        self.signal_all(sig)

    def wait(self) -> int:
        """Until every child has exited: 0 after a stop signal, else the exit status of the first child that
        died on its own (the rest are stopped then). Polls its own children only: a parent may have others."""
        alive = list(self.children)
        deadline = None
        while alive:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + STOP_TIMEOUT_S
            if deadline is not None and time.monotonic() > deadline:
                log.warning("%s: %d processes still running %.0f s after the stop; killing them", self.name,
                            len(alive), STOP_TIMEOUT_S)
                self.signal_all(signal.SIGKILL)
                deadline = float("inf")
            for child in [child for child in alive if child.poll() is not None]:
                alive.remove(child)
                if not self.stopping:
                    log.error("%s: process %d exited with %d; stopping the others", self.name, child.pid,
                              child.returncode)
                    self.failure = child.returncode or 1
                    self.stopping = True
                    self.signal_all(signal.SIGTERM)
            if alive:
                time.sleep(0.1)
        return self.failure

    def stop(self) -> int:
        """SIGTERM to every child, then `wait`."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        return self.wait()


def run_group(argv: Sequence[str], count: int, *, host: str, port: int, name: str) -> int:
    """Run `count` copies of `python -m dynamo_grpc.cli *argv --workers 1 --port P` on one port and wait for
    them; P is `port`, or a free one for 0, held by this process so every copy binds the same."""
    holder = reserve_port(host, port)
    bound = holder.getsockname()[1]
    command = [sys.executable, "-m", "dynamo_grpc.cli", *argv, "--workers", "1", "--port", str(bound)]
    group = ProcessGroup(command, count, name=name)
    previous = {sig: signal.signal(sig, group.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        group.start()
        print(f"dynamo-grpc {name}: {count} processes on {host}:{bound}", file=sys.stderr, flush=True)
        return group.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        holder.close()
