"""The walking skeleton as real processes: etcd, control plane, router, prefill and decode workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_grpc.client import RouterClient, params
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from tests.cluster import cancel_after_first_tokens
from tests.processes import RoleProcess, free_port

pytestmark = pytest.mark.slow

MODEL = "sim-tiny"
ENGINE_FLAGS = ("--engine", "simulated", "--decode-step-s", "0.002", "--model", MODEL)


async def eventually(check: Callable[[], object], timeout_s: float = 15.0, what: str = "") -> None:
    """Poll an async check until it returns truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():  # type: ignore[misc]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def fleet(etcd, tmp_path: Path) -> AsyncIterator[dict[str, RoleProcess]]:
    common = ("--etcd", etcd.endpoint, "--lease-ttl-s", "2", "--namespace", "e2e")
    procs = {
        "control-plane": RoleProcess("control-plane", *common, log_dir=tmp_path),
        "prefill": RoleProcess("prefill", *common, *ENGINE_FLAGS, log_dir=tmp_path),
        "decode": RoleProcess("decode", *common, *ENGINE_FLAGS, log_dir=tmp_path),
        "router": RoleProcess("router", *common, log_dir=tmp_path),
    }
    try:
        await asyncio.gather(*(p.wait_serving() for p in procs.values()))
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


async def test_request_flows_through_separate_processes(fleet: dict[str, RoleProcess]) -> None:
    cp_channel = grpc.aio.insecure_channel(fleet["control-plane"].endpoint)
    control = cp_grpc.ControlPlaneServiceStub(cp_channel)
    decode_channel = grpc.aio.insecure_channel(fleet["decode"].endpoint)
    prefill_channel = grpc.aio.insecure_channel(fleet["prefill"].endpoint)
    decode = decode_grpc.DecodeServiceStub(decode_channel)
    prefill = prefill_grpc.PrefillServiceStub(prefill_channel)

    # (1) Both workers registered in etcd and the control plane paired them.
    async def paired() -> bool:
        table = (await control.GetPairings(cp_pb.GetPairingsRequest())).table
        return len(table.pairings) == 1
    await eventually(paired, what="the pairing table")
    workers = (await control.ListWorkers(cp_pb.ListWorkersRequest())).workers
    by_role = {w.role: w for w in workers}
    assert by_role[pb.WORKER_ROLE_PREFILL].endpoint == fleet["prefill"].endpoint
    assert by_role[pb.WORKER_ROLE_DECODE].endpoint == fleet["decode"].endpoint

    async with RouterClient(fleet["router"].endpoint) as client:
        # (2) The router waits until it has seen the pair, then a request goes prefill -> KV -> decode.
        async def disaggregated() -> bool:
            result = await client.generate("walking skeleton", model=MODEL, max_tokens=12, ignore_eos=True).collect()
            return result.completion.kv_transfer.bytes > 0
        await eventually(disaggregated, what="a disaggregated request")
        result = await client.generate("walking skeleton", model=MODEL, max_tokens=12, ignore_eos=True).collect()
        assert result.completion.prefill_worker_id == by_role[pb.WORKER_ROLE_PREFILL].worker_id
        assert result.completion.kv_transfer.bytes == len("walking skeleton") * 4096

        # (3) The tokens equal what the decode worker computes alone.
        async def local_requests():
            yield decode_pb.DecodeRequest(request_id="local", start=decode_pb.DecodeStart(
                params=params("walking skeleton", model=MODEL, max_tokens=12, ignore_eos=True)))
        local = [t async for r in decode.Decode(local_requests()) for t in r.tokens.token_ids]
        assert result.token_ids == local

        # (4) A cancel from the client stops decode and leaves no KV anywhere.
        completion = await cancel_after_first_tokens(client.generate("cancel", model=MODEL, max_tokens=5000, ignore_eos=True))
        assert completion.finish_reason == pb.FINISH_REASON_CANCELLED
        assert completion.usage.completion_tokens < 5000
        d = (await decode.GetDecodeStats(decode_pb.GetDecodeStatsRequest())).stats
        p = (await prefill.GetPrefillStats(prefill_pb.GetPrefillStatsRequest())).stats
        assert (d.active_requests, d.used_kv_blocks, p.used_kv_blocks, p.held_transfers) == (0, 0, 0, 0)

        # (5) kill -9 the prefill worker: its lease expires, it leaves the fleet and the pairing table, and
        # requests still succeed with the decode worker prefilling locally.
        fleet["prefill"].signal(signal.SIGKILL)

        async def prefill_gone() -> bool:
            listed = (await control.ListWorkers(cp_pb.ListWorkersRequest(role=pb.WORKER_ROLE_PREFILL))).workers
            table = (await control.GetPairings(cp_pb.GetPairingsRequest())).table
            return not listed and not table.pairings
        await eventually(prefill_gone, timeout_s=8, what="the killed prefill worker's lease to expire")
        result = await client.generate("walking skeleton", model=MODEL, max_tokens=12, ignore_eos=True).collect()
        assert result.token_ids == local and result.completion.prefill_worker_id == ""

    # (6) A clean stop deregisters at once (no waiting for the lease) and exits 0.
    fleet["decode"].signal(signal.SIGTERM)
    assert fleet["decode"].wait_exit() == 0

    async def decode_gone() -> bool:
        return not (await control.ListWorkers(cp_pb.ListWorkersRequest(role=pb.WORKER_ROLE_DECODE))).workers
    await eventually(decode_gone, timeout_s=1.5, what="the stopped decode worker to deregister")
    for channel in (cp_channel, decode_channel, prefill_channel):
        await channel.close()


def test_standalone_role_without_etcd_explains_itself(tmp_path: Path) -> None:
    proc = RoleProcess("prefill", log_dir=tmp_path)
    assert proc.wait_exit() == 2
    assert "--etcd is required" in proc.log()



async def _fresh_get(url: str) -> tuple[int, str]:
    """A GET on a connection of its own, so the kernel picks one of the listening processes anew."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session, \
            session.get(url) as response:
        return response.status, await response.text()


async def _completion(url: str) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        body = {"model": MODEL, "prompt": "two processes", "max_tokens": 4, "ignore_eos": True}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _pids_answering(url: str, owner: RoleProcess, count: int) -> set[int]:
    """The pids of the `count` processes answering /health at `url` (fresh connections until all have)."""
    pids: set[int] = set()

    async def all_healthy() -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            status, text = await _fresh_get(f"{url}/health")
            if status == 200:
                pids.add(json.loads(text)["pid"])
        assert owner.proc.poll() is None, owner.log()
        return len(pids) == count
    await eventually(all_healthy, timeout_s=60, what=f"{count} processes answering {url}/health")
    return pids


async def test_frontend_workers_share_one_port_and_stop_together(etcd, fleet: dict[str, RoleProcess],
                                                                  tmp_path: Path) -> None:
    frontend = RoleProcess("frontend", "--etcd", etcd.endpoint, "--namespace", "e2e", "--workers", "2",
                           log_dir=tmp_path)
    url = f"http://{frontend.endpoint}"
    try:
        # Both processes answer /health on the one port, each with its own pid.
        pids = await _pids_answering(url, frontend, 2)
        assert frontend.proc.pid not in pids

        # Completions on fresh connections land on both, and each process counts its own.
        for _ in range(16):
            assert (await _completion(url))["usage"]["completion_tokens"] == 4
        # Whichever process a scrape reaches answers for both, each series labelled with its process.
        def served_by_process(text: str) -> dict[str, int]:
            return {sample.labels["process"]: int(sample.value)
                    for family in text_string_to_metric_families(text) for sample in family.samples
                    if sample.name == "dynamo_frontend_requests_total"
                    and sample.labels.get("endpoint") == "/v1/completions" and sample.labels["status"] == "200"}

        for _ in range(4):
            served = served_by_process((await _fresh_get(f"{url}/metrics"))[1])
            assert set(served) == {"0", "1"} and sum(served.values()) == 16 and min(served.values()) > 0, served

        # SIGTERM to the parent alone: it passes it on, both processes stop, and it exits 0.
        frontend.proc.send_signal(signal.SIGTERM)
        assert frontend.wait_exit(timeout_s=20) == 0, frontend.log()
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        frontend.stop()


async def test_router_workers_serve_and_stop(etcd, fleet: dict[str, RoleProcess], tmp_path: Path) -> None:
    router = RoleProcess("router", "--etcd", etcd.endpoint, "--namespace", "e2e", "--workers", "2",
                         log_dir=tmp_path)
    try:
        await router.wait_serving(timeout_s=60)
        for _ in range(4):  # a channel of its own each: any of the two processes may answer
            async with RouterClient(router.endpoint) as client:
                result = await client.generate("hi", model=MODEL, max_tokens=3, ignore_eos=True).collect()
            assert len(result.token_ids) == 3
        assert "router: 2 processes on" in router.log()
        router.proc.send_signal(signal.SIGINT)
        assert router.wait_exit(timeout_s=20) == 0, router.log()
    finally:
        router.stop()


async def test_serve_runs_more_http_frontends_on_its_port(etcd, tmp_path: Path) -> None:
    http_port = free_port()
    serve = RoleProcess("serve", *ENGINE_FLAGS, "--etcd", etcd.endpoint, "--namespace", "serve-workers",
                        "--http-port", str(http_port), "--http-workers", "2", log_dir=tmp_path)
    url = f"http://127.0.0.1:{http_port}"
    try:
        pids = await _pids_answering(url, serve, 2)
        assert serve.proc.pid in pids  # its own frontend, and one more process
        for _ in range(6):
            assert (await _completion(url))["usage"]["completion_tokens"] == 4
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.wait_exit(timeout_s=30) == 0, serve.log()
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        serve.stop()
