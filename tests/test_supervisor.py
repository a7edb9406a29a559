"""`dynamo-grpc up`: the plan's processes start, serve, come back after a crash, and stop on `down`."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from control_plane.compiler import compile_spec
from control_plane.spec import parse_spec
from control_plane.supervisor import Supervisor, local_host
from dynamo_grpc.client import RouterClient
from tests.etcd_server import EtcdServer
from tests.processes import free_port

pytestmark = pytest.mark.slow


def spec_text(etcd: EtcdServer) -> str:
    return f"""
name: supervised
model: {{served_name: sim-tiny, engine: simulated, engine_args: {{decode_step_s: 0.002}}}}
hosts: [{{name: here, address: 127.0.0.1}}]
prefill: {{workers: 1}}
decode: {{workers: 1}}
router: {{port: {free_port()}}}
control_plane: {{port: {free_port()}}}
base_port: {free_port()}
etcd: [{etcd.endpoint}]
"""


async def answer(router: str) -> int:
    """Tokens of one request, retried while the deployment (re)starts."""
    for _ in range(150):
        try:
            async with RouterClient(router) as client:
                result = await client.generate("supervised", model="sim-tiny", max_tokens=6).collect()
            return len(result.token_ids)
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.2)
    raise AssertionError("the deployment never answered")


async def test_up_restarts_a_crashed_worker_and_down_stops_everything(etcd: EtcdServer, tmp_path: Path) -> None:
    plan = compile_spec(parse_spec(spec_text(etcd)))
    supervisor = Supervisor(plan, local_host(plan), tmp_path / "state")
    router = plan.by_role("router")[0].endpoint
    stop = asyncio.Event()
    running = asyncio.ensure_future(supervisor.run(stop))
    try:
        assert await answer(router) == 6
        assert (tmp_path / "state" / "supervisor.pid").read_text() == str(os.getpid())
        decode = next(c for c in supervisor.children if c.spec.role == "decode")
        assert decode.proc is not None
        os.killpg(decode.proc.pid, signal.SIGKILL)
        for _ in range(100):
            if decode.restarts:
                break
            await asyncio.sleep(0.1)
        assert decode.restarts == 1
        assert await answer(router) == 6
    finally:
        stop.set()
        await running
    assert all(c.proc is not None and c.proc.returncode is not None for c in supervisor.children)
    assert not (tmp_path / "state" / "supervisor.pid").exists()
    assert "decode worker" in (tmp_path / "state" / "decode-0.log").read_text()
