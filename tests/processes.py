"""Role processes for end-to-end tests: each in its own process group, killed by group, logs kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynamo_grpc.security import Tls, open_channel

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RoleProcess:
    """`dynamo-grpc <role> ...` as a child process listening on a port of its own."""

    def __init__(self, role: str, *args: str, log_dir: Path, port: int | None = None,
                 tls: Tls | None = None) -> None:
        """`port`: where it listens (default: a free one), e.g. the port of a process it replaces; `tls`: what
        the health checks of `wait_serving` connect with, for a process serving TLS."""
        self.role = role
        self.tls = tls
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{role}-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as log:  # a process replacing another adds to its log
            self.proc = subprocess.Popen([sys.executable, "-m", "dynamo_grpc.cli", role, "--port", str(self.port), *args],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    async def wait_serving(self, timeout_s: float = 30.0) -> None:
        """Poll grpc.health.v1 until the process reports SERVING."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with open_channel(self.endpoint, self.tls) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.role} exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if loop.time() > deadline:
                    raise AssertionError(f"{self.role} not serving after {timeout_s} s:\n{self.log()}")
                await asyncio.sleep(0.1)

    async def wait_http_healthy(self, timeout_s: float = 60.0) -> None:
        """Poll the HTTP frontend's /health until it answers 200."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.role} exited with {self.proc.returncode}:\n{self.log()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://{self.endpoint}/health") as response:
                        if response.status == 200:
                            return
                if loop.time() > deadline:
                    raise AssertionError(f"{self.role} not healthy after {timeout_s} s:\n{self.log()}")
                await asyncio.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def wait_exit(self, timeout_s: float = 15.0) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
