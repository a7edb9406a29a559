"""Online autoscaling of a live fleet: workers report their latency, the control plane turns the fleet's
stats into a scale target, `up` runs what the target names (up under load, steady while it lasts, down
after the cooldown, to zero when idle), and a request to a fleet at zero brings a decode worker back.

Real etcd, real processes and real gRPC; simulated engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from control_plane.autoscaler import AutoscalingTuning, PoolCapacity, PoolMetrics
from control_plane.compiler import compile_spec
from control_plane.scaling import AutoscalingConfig, FleetSampler, ScaleController
from control_plane.spec import load_spec, parse_spec
from control_plane.supervisor import Supervisor, local_host
from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.cli import autoscaling_config, build_parser, main
from dynamo_grpc.client import RouterClient
from dynamo_grpc.config import ServerConfig
from dynamo_grpc.registry import EtcdRegistry, MemoryRegistry
from dynamo_grpc.roles import RunningRole, start_decode, start_router
from dynamo_grpc.services.latency import LatencyWindow
from dynamo_grpc.slo import Objectives
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc
from tests.cluster import MODEL, deployed, worker_config
from tests.etcd_server import EtcdServer
from tests.processes import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_latency_window_keeps_the_last_seconds_and_reports_their_90th_percentile() -> None:
    clock = FakeClock()
    window = LatencyWindow(30, clock=clock)
    assert window.p90() == 0.0
    for ms in range(1, 11):
        window.add(ms)
    assert window.p90() == 9
    clock.now = 20
    window.add(100)
    assert window.p90() == 10
    clock.now = 31  # the first ten samples are older than the window
    assert window.p90() == 100
    clock.now = 51
    assert window.p90() == 0.0


def test_a_planned_spec_autoscales_to_the_planned_pools_at_the_planned_rate(tmp_path: Path) -> None:
    spec_path = tmp_path / "planned.yaml"
    assert main(["plan", "--model", "llama3_8b", "--isl", "1000", "--osl", "100", "--rate", "60", "--ttft-ms", "300",
                 "--itl-ms", "30", "--spec-out", str(spec_path), "--autoscale"]) == 0
    spec = load_spec(spec_path)
    assert spec.autoscaling is not None and spec.autoscaling.tuning.target_utilisation == 1.0
    plan = compile_spec(spec)
    config = autoscaling_config(build_parser().parse_args(list(plan.by_role("control-plane")[0].command[1:])))
    assert config is not None
    planned = (spec.prefill.workers, spec.decode.workers)

    def desired_at(rate: float) -> tuple[int, int]:
        scaler = config.autoscaler(clock=FakeClock())
        scaler.start_at(0, 1)
        decision = scaler.update(PoolMetrics(arrival_rate=rate, prefill_workers=0, decode_workers=1))
        return decision.prefill_workers, decision.decode_workers

    assert sum(planned) > 1
    assert desired_at(60.0) == planned
    assert sum(desired_at(10.0)) < sum(planned) and desired_at(10.0)[1] >= 1


async def test_workers_report_their_latency_and_the_sampler_counts_every_arrival() -> None:
    registry, clock = MemoryRegistry(), FakeClock()
    channels = ChannelPool()
    async with deployed(worker_config(decode_step_s=0.01), registry) as stubs:
        sampler = FleetSampler(registry, channels, clock=clock)
        idle = await sampler.sample()
        assert (idle.arrival_rate, idle.prefill_workers, idle.decode_workers) == (0.0, 1, 1)
        assert (idle.ttft_p90_ms, idle.itl_p90_ms) == (None, None)
        for _ in range(5):
            completion = (await stubs.router.generate(list(range(10, 60)), model=MODEL, max_tokens=8).collect()
                          ).completion
            assert completion is not None and completion.prefill_worker_id
        clock.now = 10.0
        window = await sampler.sample()
        assert window.arrival_rate == 0.5  # 5 requests in 10 s
        prefill, decode = await stubs.prefill_stats(), await stubs.decode_stats()
        assert prefill.ttft_p90_ms > 0 and decode.ttft_p90_ms > 0 and prefill.itl_p90_ms == 0
        assert 9 <= decode.itl_p90_ms < 100, decode  # 10 ms decode steps
        assert window.ttft_p90_ms == pytest.approx(prefill.ttft_p90_ms + decode.ttft_p90_ms)
        assert window.itl_p90_ms == decode.itl_p90_ms
        assert (window.prefill_queue, window.running_requests) == (0, 0)
        clock.now = 20.0  # the rate is averaged over the last 30 s, then the arrivals age out
        assert (await sampler.sample()).arrival_rate == 0.25
        clock.now = 40.0
        assert (await sampler.sample()).arrival_rate == 0.0
    await channels.close()
    await registry.close()


async def test_a_request_to_an_empty_fleet_calls_for_a_worker_and_fails_clearly_if_none_comes() -> None:
    registry = MemoryRegistry()
    router = await start_router(ServerConfig(port=0), registry, cold_start_wait_s=1.0)
    try:
        async with RouterClient(router.endpoint) as client:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await client.generate("hello", model=MODEL).collect()
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no decode worker started within 1 s" in (failure.value.details() or "")
        assert 0.9 < time.monotonic() - started < 5
        demand = cp_pb.CapacityDemand.FromString(await registry.get_document("demand") or b"")
        assert demand.model == MODEL and abs(time.time() - demand.at.ToSeconds()) < 5
    finally:
        await router.stop()
        await registry.close()


async def test_the_control_plane_answers_a_call_for_capacity_and_a_restart_keeps_its_target() -> None:
    registry = MemoryRegistry()
    tuning = AutoscalingTuning(interval_s=0.1, scale_down_cooldown_s=0.2, idle_to_zero_s=0.5)
    config = AutoscalingConfig(PoolCapacity(1.0, 1.0), Objectives(1000, 100), max_prefill=2, max_decode=2,
                               tuning=tuning)
    controller = ScaleController(registry, config)
    await controller.start()
    router = await start_router(ServerConfig(port=0), registry, cold_start_wait_s=10.0)
    decode: RunningRole | None = None
    try:
        assert (controller.target.prefill_workers, controller.target.decode_workers) == (2, 2)
        for _ in range(100):
            if controller.target.decode_workers == 0:
                break
            await asyncio.sleep(0.05)
        assert (controller.target.prefill_workers, controller.target.decode_workers) == (0, 0)
        async with RouterClient(router.endpoint) as client:
            waiting = asyncio.ensure_future(client.generate("hello", model=MODEL, max_tokens=4).collect())
            for _ in range(100):
                if controller.target.decode_workers == 1:
                    break
                await asyncio.sleep(0.05)
            assert "cold start" in controller.target.reason and not waiting.done()
            decode = await start_decode(worker_config(), registry)  # what a supervisor does on this target
            result = await asyncio.wait_for(waiting, timeout=10)
        assert result.completion is not None and result.completion.decode_worker_id == decode.worker_id
        published = controller.target
        await controller.stop()
        restarted = ScaleController(registry, config)
        await restarted.start()
        assert restarted.target == published  # not back to every planned worker
        await restarted.stop()
    finally:
        if decode is not None:
            await decode.stop()
        await controller.stop()
        await router.stop()
        await registry.close()


def spec_text(etcd: EtcdServer) -> str:
    # One worker of each pool carries 2 req/s within the objectives; the timings are short for a test.
    return f"""
name: autoscaled
model: {{served_name: {MODEL}, engine: simulated, engine_args: {{decode_step_s: 0.01}}}}
hosts: [{{name: here, address: 127.0.0.1}}]
prefill: {{workers: 2}}
decode: {{workers: 2}}
router: {{port: {free_port()}}}
control_plane: {{port: {free_port()}}}
base_port: {free_port()}
slo: {{ttft_ms: 5000, itl_ms: 1000}}
autoscaling: {{prefill_requests_per_s: 2, decode_requests_per_s: 2, interval_s: 0.5, rate_window_s: 3,
               scale_down_cooldown_s: 3, settle_s: 1, idle_to_zero_s: 6, cold_start_wait_s: 60}}
etcd: [{etcd.endpoint}]
"""


class Fleet:
    """What the test watches: registered workers per role, and every scale target published."""

    def __init__(self, registry: EtcdRegistry, control_plane: str) -> None:
        self.registry = registry
        self.control_plane = control_plane
        self.targets: list[cp_pb.ScaleTarget] = []

    async def workers(self) -> tuple[int, int]:
        listed = await self.registry.list_workers()
        return (sum(w.role == pb.WORKER_ROLE_PREFILL for w in listed),
                sum(w.role == pb.WORKER_ROLE_DECODE for w in listed))

    async def workers_are(self, expected: tuple[int, int]) -> bool:
        return await self.workers() == expected

    async def target(self) -> cp_pb.ScaleTarget:
        async with grpc.aio.insecure_channel(self.control_plane) as channel:
            stub = cp_grpc.ControlPlaneServiceStub(channel)
            return (await stub.GetScaleTarget(cp_pb.GetScaleTargetRequest(), timeout=5)).target

    async def until(self, what: str, check: Callable[[], object], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout_s:.0f} s; workers {await self.workers()}, "
                             f"targets {[(t.prefill_workers, t.decode_workers, t.reason) for t in self.targets]}")


@contextlib.asynccontextmanager
async def running(etcd: EtcdServer, state: Path) -> AsyncIterator[tuple[Fleet, str]]:
    plan = compile_spec(parse_spec(spec_text(etcd)))
    assert plan.autoscaling
    supervisor = Supervisor(plan, local_host(plan), state)
    stop = asyncio.Event()
    supervising = asyncio.ensure_future(supervisor.run(stop))
    registry = EtcdRegistry([etcd.endpoint], namespace=plan.namespace)
    await registry.connect()
    fleet = Fleet(registry, plan.by_role("control-plane")[0].endpoint)

    async def record_targets() -> None:
        async for data in registry.watch_document("scale"):
            if data:
                fleet.targets.append(cp_pb.ScaleTarget.FromString(data))

    recording = asyncio.ensure_future(record_targets())
    try:
        yield fleet, plan.by_role("router")[0].endpoint
    finally:
        recording.cancel()
        stop.set()
        await asyncio.gather(recording, supervising, return_exceptions=True)
        await registry.close()


async def ask(router: str, max_tokens: int = 10) -> pb.Completion:
    async with RouterClient(router) as client:
        result = await client.generate(list(range(20, 84)), model=MODEL, max_tokens=max_tokens).collect()
    assert result.completion is not None and len(result.token_ids) == max_tokens
    return result.completion


async def steady_load(router: str, rate: float, seconds: float) -> list[pb.Completion]:
    """Requests at `rate` per second for `seconds`; every one must be answered."""
    tasks = []
    for _ in range(int(rate * seconds)):
        tasks.append(asyncio.ensure_future(ask(router)))
        await asyncio.sleep(1 / rate)
    return list(await asyncio.gather(*tasks))


@pytest.mark.slow
async def test_the_fleet_follows_the_load_down_to_zero_and_back(etcd: EtcdServer, tmp_path: Path) -> None:
    async with running(etcd, tmp_path / "state") as (fleet, router):
        # It starts as planned: every worker, then nothing to do, so it shrinks and goes to zero.
        await fleet.until("every planned worker started", lambda: fleet.targets and fleet.targets[0].version == 1)
        assert (fleet.targets[0].prefill_workers, fleet.targets[0].decode_workers) == (2, 2)
        await fleet.until("idle fleet at zero", lambda: fleet.targets[-1].decode_workers == 0)
        assert "zero" in fleet.targets[-1].reason
        await fleet.until("every worker stopped", lambda: fleet.workers_are((0, 0)))
        target = await fleet.target()
        assert (target.prefill_workers, target.decode_workers) == (0, 0)

        # A request to the empty fleet waits at the router while a decode worker starts, then is answered.
        started = time.monotonic()
        completion = await ask(router)
        cold_start_s = time.monotonic() - started
        assert completion.decode_worker_id == "decode-0"
        assert any("cold start" in t.reason for t in fleet.targets)
        print(f"\ncold start: answered {cold_start_s:.1f} s after the request reached an empty fleet")

        # Load above one worker's share: both pools grow to their planned most, once, and stay there.
        before = len(fleet.targets)
        completions = await steady_load(router, rate=6.0, seconds=12.0)
        under_load = fleet.targets[before:]
        assert (fleet.targets[-1].prefill_workers, fleet.targets[-1].decode_workers) == (2, 2), under_load
        assert len(under_load) <= 2, [(t.prefill_workers, t.decode_workers, t.reason) for t in under_load]
        assert await fleet.workers() == (2, 2)
        served_by = {c.decode_worker_id for c in completions[-20:]}
        assert served_by == {"decode-0", "decode-1"}
        assert {c.prefill_worker_id for c in completions[-20:]} <= {"prefill-0", "prefill-1"}

        # Load gone: down after the cooldown, then to zero; no worker is left running.
        await fleet.until("idle fleet back at zero", lambda: fleet.workers_are((0, 0)))
        downs = [(t.prefill_workers, t.decode_workers) for t in fleet.targets[before + len(under_load):]]
        assert downs[-1] == (0, 0) and all(a >= b for a, b in itertools.pairwise(downs)), downs
        print("scale targets:\n" + "\n".join(f"  v{t.version}: {t.prefill_workers}P {t.decode_workers}D  {t.reason}"
                                             for t in fleet.targets))

