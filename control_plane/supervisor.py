"""The local target: run a plan's processes for one host, restart the ones that die, stop them all in order.

`dynamo-grpc up SPEC` runs a `Supervisor` in the foreground; `dynamo-grpc down SPEC` (another shell)
signals it through the pid file in its state folder. Each process logs to `<state>/<id>.log`.
Start order: control plane, workers, router (so it finds workers); stop order is the reverse.

An autoscaled plan's workers run only while the control plane's scale target names them: the first
`prefill_workers` prefill and `decode_workers` decode workers of the plan, in plan order (so on every
host the same rule picks the same workers, and a pool shrinks from its end). The supervisor follows the
target in etcd, starts what it adds and stops (SIGTERM: drain, deregister) what it removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.compiler import Plan, PlannedProcess
from dynamo_grpc.registry import SCALE_DOCUMENT, EtcdAccess, EtcdRegistry
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

log = logging.getLogger(__name__)

STATE_ROOT = Path(os.environ.get("DYNAMO_GRPC_STATE_DIR") or Path.home() / ".cache" / "dynamo-grpc" / "up")
_ORDER = {"control-plane": 0, "prefill": 1, "decode": 1, "router": 2}
_STOP_GRACE_S = 10.0


def state_dir(plan: Plan) -> Path:
    return STATE_ROOT / plan.name


def local_host(plan: Plan) -> str:
    """The plan's host this machine is: named like it, or the only host, or the one on a loopback address."""
    hosts = {p.host: p.address for p in plan.processes}
    if len(hosts) == 1:
        return next(iter(hosts))
    names = {socket.gethostname(), socket.getfqdn()}
    for host, address in sorted(hosts.items()):
        if host in names or address.startswith("127.") or address == "localhost":
            return host
    raise ValueError(f"none of the plan's hosts ({', '.join(sorted(hosts))}) is this machine; pass --host")


@dataclass
class _Child:
    spec: PlannedProcess
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    backoff_s: float = 1.0
    wanted: bool = True
    """False while the scale target leaves this worker out: it is stopped and not restarted."""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@dataclass
class Supervisor:
    plan: Plan
    host: str
    state: Path
    max_backoff_s: float = 30.0
    etcd_access: EtcdAccess = field(default_factory=EtcdAccess)
    children: list[_Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        mine = [p for p in self.plan.processes if p.host == self.host]
        if not mine:
            raise ValueError(f"the plan has no processes on host {self.host!r}")
        self.children = [_Child(p) for p in sorted(mine, key=lambda p: _ORDER.get(p.role, 1))]

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, keep it running until `stop` is set, then stop everything."""
        self.state.mkdir(parents=True, exist_ok=True)
        pid_file = self.state / "supervisor.pid"
        pid_file.write_text(str(os.getpid()))
        following: asyncio.Task[None] | None = None
        try:
            for child in self.children:
                child.wanted = not (self.plan.autoscaling and child.spec.role in ("prefill", "decode"))
                if child.wanted:
                    await self._start(child)
            if self.plan.autoscaling:
                following = asyncio.create_task(self._follow_scale_target())
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
                for child in self.children:
                    if not stop.is_set() and child.wanted and child.proc is not None and \
                            child.proc.returncode is not None:
                        await self._restart(child, stop)
        finally:
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            await self._stop_all()
            pid_file.unlink(missing_ok=True)

    async def scale_to(self, target: cp_pb.ScaleTarget) -> None:
        """Run exactly this host's share of the first N workers of each pool."""
        counts = {"prefill": target.prefill_workers, "decode": target.decode_workers}
        named = {p.id for role, count in counts.items() for p in self.plan.by_role(role)[:count]}
        stopping = []
        for child in self.children:
            if child.spec.role not in counts:
                continue
            child.wanted = child.spec.id in named
            if child.wanted and not child.running:
                child.backoff_s = 1.0
                await self._start(child)
            elif not child.wanted and child.running:
                stopping.append(self._stop(child))
        if stopping:
            await asyncio.gather(*stopping)

    async def _follow_scale_target(self) -> None:
        """Follow the control plane's scale target in etcd; reconnect while etcd is away."""
        while True:
            registry = EtcdRegistry(list(self.plan.etcd), namespace=self.plan.namespace,
                                    access=self.etcd_access)
            try:
                await registry.connect()
                async for data in registry.watch_document(SCALE_DOCUMENT):
                    if data:
                        target = cp_pb.ScaleTarget.FromString(data)
                        log.info("scale target v%d: %d prefill, %d decode workers (%s)", target.version,
                                 target.prefill_workers, target.decode_workers, target.reason or "-")
                        await self.scale_to(target)
            except Exception as error:  # noqa: BLE001 - keep following once etcd is back
                log.warning("cannot follow the scale target in etcd (%s); retrying in 2 s", error)
            finally:
                await registry.close()
            await asyncio.sleep(2.0)

    async def _start(self, child: _Child) -> None:
        command = list(child.spec.command)
        if command[0] == "dynamo-grpc":  # the same interpreter, whether or not the script is on PATH
            command[:1] = [sys.executable, "-m", "dynamo_grpc.cli"]
        with open(self.state / f"{child.spec.id}.log", "ab") as out:  # noqa: ASYNC230 - a local file, once
            child.proc = await asyncio.create_subprocess_exec(
                *command, stdout=out, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **child.spec.env},
                start_new_session=True)
        log.info("started %s (pid %d): %s", child.spec.id, child.proc.pid, child.spec.shell())

    async def _restart(self, child: _Child, stop: asyncio.Event) -> None:
        assert child.proc is not None
        log.warning("%s exited with %s; restarting in %.0f s (see %s)", child.spec.id, child.proc.returncode,
                    child.backoff_s, self.state / f"{child.spec.id}.log")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=child.backoff_s)
        if stop.is_set() or not child.wanted or child.running:  # scaled away, or started again meanwhile
            return
        child.restarts += 1
        child.backoff_s = min(child.backoff_s * 2, self.max_backoff_s)
        await self._start(child)

    async def _stop_all(self) -> None:
        for child in reversed(self.children):
            await self._stop(child)

    async def _stop(self, child: _Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=_STOP_GRACE_S)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", child.spec.id, _STOP_GRACE_S)
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.info("stopped %s", child.spec.id)


def signal_down(plan: Plan, *, timeout_s: float = 30.0) -> bool:
    """Ask a running `up` of this plan to stop everything; False when none is running."""
    import time

    pid_file = state_dir(plan) / "supervisor.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    raise TimeoutError(f"`dynamo-grpc up` (pid {pid}) did not stop within {timeout_s:.0f} s")
