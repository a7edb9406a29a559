"""The router's live view of the fleet: workers from the registry, pairings from the control plane."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.errors import NotFound, Unavailable
from dynamo_grpc.kv.events import PrefixIndex
from dynamo_grpc.registry import DEMAND_DOCUMENT, PAIRINGS_DOCUMENT, Registry
from dynamo_grpc.routing.pairing import compute_pairings
from dynamo_grpc.routing.policies import DEFAULT_POLICY, Load, routing_policy
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import kv_events_pb2 as events_pb
from dynamo_grpc.v1 import kv_events_pb2_grpc as events_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_RETRY_S = 10.0
DEFAULT_LOAD_POLL_S = 0.5


@dataclass(frozen=True)
class DisaggregationPolicy:
    """When a request with a paired prefill worker still prefills on its decode worker."""

    min_prompt_tokens: int = 0
    """Shorter prompts prefill locally: moving their KV costs more than it saves. 0: always disaggregate."""
    max_prefill_queue: int = 0
    """A prefill worker with this many requests in flight from this router is saturated. 0: no limit."""


ALWAYS_DISAGGREGATE = DisaggregationPolicy()


class InFlight:
    """Per worker, the requests running there and the prompt tokens they still have to compute."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()

    @contextlib.contextmanager
    def busy(self, worker_id: str, tokens: int = 0) -> Iterator[None]:
        """Count a request, and the prompt tokens it has to compute there, against a worker while it runs."""
        self.requests[worker_id] += 1
        self.tokens[worker_id] += tokens
        try:
            yield
        finally:
            self.requests[worker_id] -= 1
            self.tokens[worker_id] -= tokens


@dataclass(frozen=True)
class Route:
    """Where one request runs; no prefill worker means the decode worker prefills locally."""

    decode: pb.WorkerInfo
    prefill: pb.WorkerInfo | None
    uncached_tokens: int = 0
    """Prompt tokens the prefilling worker (the prefill one, else the decode one) has to compute."""
    kv_transports: tuple[int, ...] = ()
    """How the pair moves KV, in the order the decode worker tries them (`pairing.kv_transports`)."""


class Fleet:
    """Follows the registry and picks a compatible pair per request, ranked by the routing policy
    (`routing/policies.py`); equally ranked candidates take turns.

    A worker's load is the larger of the requests this router sent it and the requests it reports
    running (every `load_poll_s`, so requests from other routers count too), and the prompt tokens it
    still has to compute, counting what its prefix cache holds (from every worker's KV events, for the
    policies that read them).
    Pairings come from the control plane's published table when there is one; without a control
    plane, the router derives the same table itself, so a router works standalone.
    """

    def __init__(self, registry: Registry, policy: DisaggregationPolicy = ALWAYS_DISAGGREGATE, *,
                 routing: str = DEFAULT_POLICY, channels: ChannelPool | None = None,
                 load_poll_s: float = DEFAULT_LOAD_POLL_S) -> None:
        self._registry = registry
        self._policy = policy
        self.routing = routing_policy(routing)
        self.workers: dict[str, pb.WorkerInfo] = {}
        self.prefix_index = PrefixIndex()
        self._own_channels = channels is None
        self._channels = channels if channels is not None else ChannelPool()
        self._load_poll_s = load_poll_s
        self._reported: dict[str, pb.WorkerStats] = {}
        self._feeds: dict[str, tuple[str, list[asyncio.Task[None]]]] = {}
        self._table: cp_pb.PairingTable | None = None
        self._in_flight = InFlight()
        self._turn = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._first_snapshot = asyncio.Event()
        self._called_for_capacity = -math.inf

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_following("workers", self._follow_workers)),
                       asyncio.create_task(self._keep_following("pairings", self._follow_pairings))]
        await self._first_snapshot.wait()

    async def stop(self) -> None:
        tasks = [*self._tasks, *(task for _, feeds in self._feeds.values() for task in feeds)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_channels:
            await self._channels.close()

    def route(self, model: str, request_id: str, *, prompt_tokens: int = 0, prompt: Sequence[int] | None = None,
              exclude: Collection[str] = ()) -> Route:
        """The pair for a request; `exclude` names decode workers that just failed it. `prompt` (token ids)
        lets the kv_aware policy count cached tokens. A short uncached prompt, or a saturated prefill
        worker, keeps the prefill on the decode worker (conditional disaggregation)."""
        decodes = {w.worker_id: w for w in self.workers.values()
                   if w.role == pb.WORKER_ROLE_DECODE and w.model == model and w.worker_id not in exclude}
        if not decodes:
            served = sorted({w.model for w in self.workers.values() if w.role == pb.WORKER_ROLE_DECODE})
            if not served:
                raise Unavailable("no decode workers are registered; start one with `dynamo-grpc decode`",
                                  request_id=request_id, reason="NO_WORKERS")
            raise NotFound(f"model {model!r} is not served; served models: {', '.join(served)}",
                           request_id=request_id, reason="MODEL_NOT_FOUND")
        pairs = self._live_pairs(decodes)
        prompt_tokens = len(prompt) if prompt is not None else prompt_tokens
        cached: dict[str, int] = {}
        if self.routing.uses_prefix_cache and prompt is not None:
            cached = self.prefix_index.cached_tokens(prompt, {*decodes, *(p.prefill_worker_id for p in pairs)})

        def uncached(worker_id: str) -> int:
            return prompt_tokens - cached.get(worker_id, 0)

        load = Load(requests_at=self._requests_at, kv_usage=self._kv_usage,
                    prefill_work=lambda worker_id: self._in_flight.tokens[worker_id] + uncached(worker_id))
        turn = next(self._turn)

        def in_turn(items: list[T]) -> list[T]:
            """Starting one further each request: the first of equals takes the request, so equals alternate."""
            return items[turn % len(items):] + items[:turn % len(items)]

        if not pairs:
            decode = min(in_turn(sorted(decodes)), key=lambda worker_id: self.routing.rank_decode(worker_id, load))
            return Route(decode=decodes[decode], prefill=None, uncached_tokens=uncached(decode))
        best = min(in_turn(sorted(pairs, key=lambda p: (p.prefill_worker_id, p.decode_worker_id))),
                   key=lambda pair: self.routing.rank_pair(pair, load))
        decode, policy = decodes[best.decode_worker_id], self._policy
        if uncached(decode.worker_id) < policy.min_prompt_tokens or (
                policy.max_prefill_queue and self._requests_at(best.prefill_worker_id) >= policy.max_prefill_queue):
            return Route(decode=decode, prefill=None, uncached_tokens=uncached(decode.worker_id))
        return Route(decode=decode, prefill=self.workers[best.prefill_worker_id],
                     uncached_tokens=uncached(best.prefill_worker_id), kv_transports=tuple(best.kv_transports))

    async def until_paired(self, timeout: float) -> bool:
        """Wait until some prefill worker is paired with a decode worker in this router's view (the
        control plane's table can trail the registry by a watch event); False after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self._live_pairs(self.workers):
                return True
            await asyncio.sleep(0.05)
        return False

    async def until_decode_worker(self, model: str, timeout: float, cancelled: asyncio.Event) -> bool:
        """Wait for a decode worker of `model` while calling for one (a `CapacityDemand`, every second)
        so an autoscaled fleet at zero starts one; False after `timeout` or once `cancelled` is set."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and not cancelled.is_set():
            if any(w.role == pb.WORKER_ROLE_DECODE and w.model == model for w in self.workers.values()):
                return True
            if loop.time() - self._called_for_capacity >= 1.0:  # one call a second, however many wait
                self._called_for_capacity = loop.time()
                demand = cp_pb.CapacityDemand(model=model)
                demand.at.GetCurrentTime()
                try:
                    await self._registry.put_document(DEMAND_DOCUMENT, demand.SerializeToString())
                except Exception as error:  # noqa: BLE001 - the registry may be back by the next call
                    log.warning("fleet: could not call for capacity (%s)", error)
            await asyncio.sleep(0.05)
        return False

    def _live_pairs(self, decodes: Collection[str]) -> list[cp_pb.Pairing]:
        """Pairs of live workers with a decode worker among `decodes`: from the control plane's table, or
        derived here without a control plane, or while its table has none for them yet (it trails the
        registry by a watch event, and pairs by the same rule)."""
        def live(table: cp_pb.PairingTable) -> list[cp_pb.Pairing]:
            return [p for p in table.pairings if p.decode_worker_id in decodes and p.prefill_worker_id in self.workers]

        published = live(self._table) if self._table is not None else []
        return published or live(compute_pairings(self.workers.values()))

    def _requests_at(self, worker_id: str) -> int:
        reported = self._reported.get(worker_id)
        return max(self._in_flight.requests[worker_id], reported.active_requests if reported else 0)

    def _kv_usage(self, worker_id: str) -> float:
        reported = self._reported.get(worker_id)
        return reported.used_kv_blocks / reported.total_kv_blocks if reported and reported.total_kv_blocks else 0.0

    def engine_of(self, model: str) -> str:
        """The engine kind serving `model` ("" when none is registered)."""
        return next((w.engine for w in self.workers.values() if w.model == model), "")

    def busy(self, worker: pb.WorkerInfo, tokens: int = 0) -> contextlib.AbstractContextManager[None]:
        """Count a request, and the prompt tokens it has to compute there, against a worker while it runs."""
        return self._in_flight.busy(worker.worker_id, tokens)

    async def _keep_following(self, what: str, follow: Callable[[], Awaitable[None]]) -> None:
        """A watch that fails is started again, so the router never keeps serving from a frozen view."""
        delay = 0.5
        while True:
            try:
                await follow()
                return  # the registry was closed
            except Exception as error:  # noqa: BLE001 - logged, then retried
                log.warning("fleet: watching %s failed (%s); retrying in %.1f s", what, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_S)

    async def _follow_workers(self) -> None:
        async for snapshot in self._registry.watch_workers():
            joined, left = snapshot.keys() - self.workers.keys(), self.workers.keys() - snapshot.keys()
            if joined or left:
                log.info("fleet: %d workers (joined: %s; left: %s)", len(snapshot), sorted(joined) or "-",
                         sorted(left) or "-")
            self.workers = snapshot
            self._follow_each_worker()
            self._first_snapshot.set()

    def _follow_each_worker(self) -> None:
        """Per worker, its reported load and (for kv_aware) its KV-event feed."""
        for worker_id, (endpoint, feeds) in list(self._feeds.items()):
            worker = self.workers.get(worker_id)
            if worker is None or worker.endpoint != endpoint:  # gone, or back at another address
                for task in feeds:
                    task.cancel()
                del self._feeds[worker_id]
                self.prefix_index.forget(worker_id)
                self._reported.pop(worker_id, None)
        for worker_id, worker in self.workers.items():
            if worker_id not in self._feeds and worker.role in (pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE):
                feeds = [asyncio.create_task(self._follow_cache(worker))] if self.routing.uses_prefix_cache else []
                if self._load_poll_s > 0:
                    feeds.append(asyncio.create_task(self._poll_load(worker)))
                self._feeds[worker_id] = (worker.endpoint, feeds)

    async def _poll_load(self, worker: pb.WorkerInfo) -> None:
        """The worker's own count of running requests and used KV blocks, from every router's requests."""
        channel = self._channels.get(worker.endpoint)
        while True:
            try:
                self._reported[worker.worker_id] = await worker_stats(channel, worker.role,
                                                                      timeout=self._load_poll_s * 4)
            except grpc.aio.AioRpcError:
                self._reported.pop(worker.worker_id, None)  # unreachable: judged by this router's count alone
            await asyncio.sleep(self._load_poll_s)

    async def _follow_cache(self, worker: pb.WorkerInfo) -> None:
        """Index the worker's cache; a broken feed is dropped from the index and restarted (it begins
        with a full snapshot). A worker whose engine reports no events stays out of the index."""
        delay = 0.5
        stub = events_grpc.KvEventServiceStub(self._channels.get(worker.endpoint))
        while True:
            try:
                async for change in stub.WatchKvEvents(events_pb.WatchKvEventsRequest()):
                    self.prefix_index.apply(worker.worker_id, change)
                    delay = 0.5
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
                log.debug("fleet: KV events of %s: %s; retrying in %.1f s", worker.worker_id, error.details(), delay)
            self.prefix_index.forget(worker.worker_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_S)

    async def _follow_pairings(self) -> None:
        async for data in self._registry.watch_document(PAIRINGS_DOCUMENT):
            self._table = None if data is None else cp_pb.PairingTable.FromString(data)


async def worker_stats(channel: grpc.aio.Channel, role: int, *, timeout: float) -> pb.WorkerStats:
    """A prefill or decode worker's stats, through the service of its role."""
    if role == pb.WORKER_ROLE_PREFILL:
        prefill = prefill_grpc.PrefillServiceStub(channel)
        return (await prefill.GetPrefillStats(prefill_pb.GetPrefillStatsRequest(), timeout=timeout)).stats
    decode = decode_grpc.DecodeServiceStub(channel)
    return (await decode.GetDecodeStats(decode_pb.GetDecodeStatsRequest(), timeout=timeout)).stats
