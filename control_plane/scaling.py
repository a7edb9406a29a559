"""Online autoscaling of a live fleet: worker stats in, a published scale target out.

The control plane samples every worker's stats each `interval_s` (`FleetSampler`), feeds the window to
the `PoolAutoscaler`, and publishes the resulting `ScaleTarget` in the registry, where the supervisor of
every host follows it (`control_plane.supervisor`). A router that finds no decode worker writes a
`CapacityDemand`; the controller answers it at once with one decode worker (a cold start from zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from control_plane.autoscaler import (
    AutoscalingTuning,
    PoolAutoscaler,
    PoolCapacity,
    PoolMetrics,
    ScaleDecision,
)
from dynamo_grpc import metrics
from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.registry import DEMAND_DOCUMENT, SCALE_DOCUMENT, Registry
from dynamo_grpc.routing.fleet import worker_stats
from dynamo_grpc.security import Tls
from dynamo_grpc.slo import Objectives
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

log = logging.getLogger(__name__)

DEMAND_FRESH_S = 30.0
"""A demand older than this (e.g. left in etcd from before a restart) starts nothing."""


@dataclass(frozen=True)
class AutoscalingConfig:
    """What the control plane needs to size the pools of one deployment."""

    capacity: PoolCapacity
    objectives: Objectives
    max_prefill: int
    max_decode: int
    tuning: AutoscalingTuning = field(default_factory=AutoscalingTuning)

    def autoscaler(self, clock: Callable[[], float] = time.monotonic) -> PoolAutoscaler:
        return PoolAutoscaler(self.capacity, self.objectives, self.tuning, clock=clock,
                              max_prefill=self.max_prefill, max_decode=self.max_decode)


class FleetSampler:
    """One observation window of the live fleet, from the stats every worker reports.

    Arrivals are counted where every request ends up, on the decode workers (running plus finished since
    start, compared with the last sample); the rate is taken over the last `rate_window_s`, since a short
    window of Poisson arrivals swings by a worker's worth either way. TTFT is the slowest prefill
    worker's p90 plus the slowest decode worker's p90 time to first token (an upper estimate of the p90
    a client sees); ITL is the slowest decode worker's p90. Requests at prefill workers count as that
    pool's queue.
    """

    def __init__(self, registry: Registry, channels: ChannelPool, *, model: str = "",
                 rate_window_s: float = AutoscalingTuning.rate_window_s,
                 clock: Callable[[], float] = time.monotonic, timeout_s: float = 2.0) -> None:
        self._registry = registry
        self._channels = channels
        self._model = model
        self._rate_window_s = rate_window_s
        self._clock = clock
        self._timeout_s = timeout_s
        self._started: dict[str, int] = {}
        self._last_wall = time.time()
        self._arrivals: deque[tuple[float, int]] = deque([(clock(), 0)])
        """(sample time, arrivals counted since this sampler began)"""

    async def sample(self) -> PoolMetrics:
        workers = [w for w in await self._registry.list_workers()
                   if w.role in (pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE) and
                   (not self._model or w.model == self._model)]
        reports = await asyncio.gather(*(self._stats(w) for w in workers))
        now, wall = self._clock(), time.time()
        previous_wall, self._last_wall = self._last_wall, wall
        prefill = [s for w, s in zip(workers, reports) if s is not None and w.role == pb.WORKER_ROLE_PREFILL]
        decode = [(w, s) for w, s in zip(workers, reports) if s is not None and w.role == pb.WORKER_ROLE_DECODE]
        arrivals = 0
        started = {w.worker_id: s.requests_finished + s.active_requests for w, s in decode}
        for worker, _ in decode:
            # A worker that started since the last sample counts from zero; one seen first now, from now.
            new = worker.started_at.ToSeconds() >= previous_wall
            arrivals += max(0, started[worker.worker_id] - self._started.get(
                worker.worker_id, 0 if new else started[worker.worker_id]))
        self._started = started
        self._arrivals.append((now, self._arrivals[-1][1] + arrivals))
        while len(self._arrivals) > 2 and self._arrivals[1][0] <= now - self._rate_window_s:
            self._arrivals.popleft()
        since, counted = self._arrivals[0]
        elapsed = now - since
        rate = (self._arrivals[-1][1] - counted) / elapsed if elapsed > 0 else 0.0

        def slowest(values: list[float]) -> float:
            return max(values, default=0.0)

        ttft = slowest([s.ttft_p90_ms for s in prefill]) + slowest([s.ttft_p90_ms for _, s in decode])
        itl = slowest([s.itl_p90_ms for _, s in decode])
        return PoolMetrics(
            arrival_rate=rate, ttft_p90_ms=ttft or None, itl_p90_ms=itl or None,
            prefill_queue=sum(s.active_requests for s in prefill),
            running_requests=sum(s.active_requests for _, s in decode),
            prefill_workers=sum(w.role == pb.WORKER_ROLE_PREFILL for w in workers),
            decode_workers=sum(w.role == pb.WORKER_ROLE_DECODE for w in workers))

    async def _stats(self, worker: pb.WorkerInfo) -> pb.WorkerStats | None:
        try:
            return await worker_stats(self._channels.get(worker.endpoint), worker.role, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            log.debug("autoscaler: no stats from %s (%s)", worker.worker_id, error.details())
            return None


class ScaleController:
    """Runs the autoscaler against the live fleet and publishes its target for the supervisors."""

    def __init__(self, registry: Registry, config: AutoscalingConfig, *, model: str = "",
                 channels: ChannelPool | None = None, tls: Tls | None = None) -> None:
        self._registry = registry
        self._config = config
        self._own_channels = channels is None
        self._channels = channels or ChannelPool(tls)
        self._sampler = FleetSampler(registry, self._channels, model=model,
                                     rate_window_s=config.tuning.rate_window_s)
        self._autoscaler = config.autoscaler()
        self.target = cp_pb.ScaleTarget()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Resume from the published target (a restarted control plane keeps the fleet as it is), or
        start with every planned worker."""
        data = await self._registry.get_document(SCALE_DOCUMENT)
        most = (self._config.max_prefill, self._config.max_decode)
        if data:
            self.target = cp_pb.ScaleTarget.FromString(data)
            if self.target.prefill_workers > most[0] or self.target.decode_workers > most[1]:
                await self._publish(ScaleDecision(min(self.target.prefill_workers, most[0]),
                                                  min(self.target.decode_workers, most[1]),
                                                  "start: the plan allows fewer workers than were running"))
        else:
            await self._publish(ScaleDecision(*most, "start: every planned worker"))
        self._autoscaler.start_at(self.target.prefill_workers, self.target.decode_workers)
        log.info("autoscaling: %d prefill, %d decode workers (%s); every %g s", self.target.prefill_workers,
                 self.target.decode_workers, self.target.reason, self._config.tuning.interval_s)
        self._tasks = [asyncio.create_task(self._sample_every_interval()),
                       asyncio.create_task(self._answer_demand())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_channels:
            await self._channels.close()

    async def _sample_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._config.tuning.interval_s)
            try:
                metrics = await self._sampler.sample()
                await self._publish(self._autoscaler.update(metrics))
            except Exception as error:  # noqa: BLE001 - one failed window must not end autoscaling
                log.warning("autoscaling: this window failed (%s); trying again in %g s", error,
                            self._config.tuning.interval_s)

    async def _answer_demand(self) -> None:
        """Start a decode worker for a router's fresh call; the watch is started again if it breaks."""
        while True:
            try:
                async for data in self._registry.watch_document(DEMAND_DOCUMENT):
                    if data and time.time() - cp_pb.CapacityDemand.FromString(data).at.ToSeconds() <= DEMAND_FRESH_S:
                        await self._publish(self._autoscaler.request_arrived())
                return  # the registry was closed
            except Exception as error:  # noqa: BLE001 - cold starts must keep working once it is back
                log.warning("autoscaling: watching for calls for capacity failed (%s); again in 2 s", error)
                await asyncio.sleep(2.0)

    def metric_samples(self) -> list[metrics.Sample]:
        """The published scale target, for /metrics."""
        target, name = self.target, "dynamo_control_plane_scale_target_workers"
        return [(name, {"pool": "prefill"}, float(target.prefill_workers)),
                (name, {"pool": "decode"}, float(target.decode_workers)),
                ("dynamo_control_plane_scale_target_version", {}, float(target.version))]

    async def _publish(self, decision: ScaleDecision) -> None:
        if (decision.prefill_workers, decision.decode_workers) == (self.target.prefill_workers,
                                                                  self.target.decode_workers) and self.target.version:
            return
        target = cp_pb.ScaleTarget(prefill_workers=decision.prefill_workers, decode_workers=decision.decode_workers,
                                   reason=decision.reason, version=self.target.version + 1)
        target.changed_at.GetCurrentTime()
        await self._registry.put_document(SCALE_DOCUMENT, target.SerializeToString())
        self.target = target
        log.info("autoscaling v%d: %d prefill, %d decode workers (%s)", target.version, target.prefill_workers,
                 target.decode_workers, target.reason)

