"""The router's live view of the fleet: workers from the registry, pairings from the control plane."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import grpc

from dynamo_grpc import metrics
from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.errors import NotFound, Unavailable
from dynamo_grpc.kv.events import PrefixIndex
from dynamo_grpc.registry import DEMAND_DOCUMENT, PAIRINGS_DOCUMENT, Registry
from dynamo_grpc.routing.pair_choice import Side, candidate_sides, choose_pair
from dynamo_grpc.routing.pairing import PairGroup, groups_of, pair_transports, pairing_groups
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

_MAX_RETRY_S = 10.0
DEFAULT_LOAD_POLL_S = 0.5

DOWN_FOR_S = 5.0
"""How long routing passes by a worker a call found unreachable; its registration outlives a crash by up
to its lease TTL (10 s by default)."""


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
class _View:
    """What `route` reads of the fleet, derived once per change of the workers or of the pairing table."""

    workers: dict[str, pb.WorkerInfo]
    table: cp_pb.PairingTable | None
    decodes: dict[str, list[str]]
    """Per model, its decode workers, sorted."""
    hosts: dict[str, str]
    published: list[PairGroup]
    """The control plane's pairs."""
    derived: list[PairGroup]
    """The pairs by the pairing rule, for requests the table has no live pair for yet."""
    transports: dict[str, Sequence[int]]
    """Per prefill worker, its group's KV transports: the table's where it lists the worker, else derived."""

    @classmethod
    def of(cls, workers: dict[str, pb.WorkerInfo], table: cp_pb.PairingTable | None) -> _View:
        decodes: dict[str, list[str]] = {}
        for worker_id in sorted(workers):
            if workers[worker_id].role == pb.WORKER_ROLE_DECODE:
                decodes.setdefault(workers[worker_id].model, []).append(worker_id)
        derived_groups = pairing_groups(workers.values())
        derived = [PairGroup(tuple(g.prefill_worker_ids), tuple(g.decode_worker_ids)) for g in derived_groups]
        transports = {p: g.kv_transports for g in derived_groups for p in g.prefill_worker_ids}
        if table is not None:
            transports.update((p, g.kv_transports) for g in table.groups for p in g.prefill_worker_ids)
        hosts = {worker_id: worker.host for worker_id, worker in workers.items()}
        return cls(workers, table, decodes, hosts, groups_of(table) if table is not None else [], derived,
                   transports)

    def sides(self, decodes: Collection[str]) -> list[Side]:
        """The candidate pairs of a request whose decode worker is one of `decodes`: the table's, or derived
        here while the table has none for them (it trails the registry by a watch event, and pairs by the
        same rule)."""
        return (candidate_sides(self.published, self.workers, decodes)
                or candidate_sides(self.derived, self.workers, decodes))


@dataclass(frozen=True)
class Route:
    """Where one request runs; no prefill worker means the decode worker prefills locally."""

    decode: pb.WorkerInfo
    prefill: pb.WorkerInfo | None
    uncached_tokens: int = 0
    """Prompt tokens the prefilling worker (the prefill one, else the decode one) has to compute."""
    kv_transports: tuple[int, ...] = ()
    """How the pair moves KV, in the order the decode worker tries them (`pairing.pair_transports`)."""


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
        self._engines: dict[str, str] = {}
        """Model -> the engine kind of its workers, looked up per request."""
        self.prefix_index = PrefixIndex()
        self._own_channels = channels is None
        self._channels = channels if channels is not None else ChannelPool()
        self._load_poll_s = load_poll_s
        self._reported: dict[str, pb.WorkerStats] = {}
        # What the policies read of each worker, kept up to date as it changes, so a decision over hundreds
        # of workers reads them with no Python call each.
        self._requests: defaultdict[str, int] = defaultdict(int)
        """Requests running on the worker: the larger of those this router sent and those it reports."""
        self._kv_share: defaultdict[str, float] = defaultdict(float)
        """Share of the worker's KV blocks in use, as it reports (0 when unknown)."""
        self._feeds: dict[str, tuple[str, list[asyncio.Task[None]]]] = {}
        self._table: cp_pb.PairingTable | None = None
        self._view = _View.of(self.workers, None)
        self._in_flight = InFlight()
        self._turn = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._first_snapshot = asyncio.Event()
        self._called_for_capacity = -math.inf
        self._down: dict[str, float] = {}
        """Workers a call just found unreachable -> until when routing passes them by."""

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
        view = self._current_view()
        if self._down:
            exclude = self._excluding_down(exclude, view.decodes.get(model, ()))
        decode_ids = [d for d in view.decodes.get(model, ()) if d not in exclude]
        if not decode_ids:
            if not view.decodes:
                raise Unavailable("no decode workers are registered; start one with `dynamo-grpc decode`",
                                  request_id=request_id, reason="NO_WORKERS")
            raise NotFound(f"model {model!r} is not served; served models: {', '.join(sorted(view.decodes))}",
                           request_id=request_id, reason="MODEL_NOT_FOUND")
        decodes = set(decode_ids)
        sides = view.sides(decodes)
        prompt_tokens = len(prompt) if prompt is not None else prompt_tokens
        cached: dict[str, int] = {}
        if self.routing.uses_prefix_cache and prompt is not None:
            cached = self.prefix_index.cached_tokens(prompt)  # of every worker: the candidates' are read

        def uncached(worker_id: str) -> int:
            return prompt_tokens - cached.get(worker_id, 0)

        tokens = self._in_flight.tokens
        load = Load(requests_at=self._requests.__getitem__, kv_usage=self._kv_share.__getitem__,
                    prefill_work=lambda worker: tokens.get(worker, 0) + prompt_tokens - cached.get(worker, 0))
        turn = next(self._turn)
        if not sides:
            start = turn % len(decode_ids)  # equals take turns: the first of them from here on takes it
            decode = min(decode_ids[start:] + decode_ids[:start],
                         key=lambda worker_id: self.routing.rank_decode(worker_id, load))
            return Route(decode=self.workers[decode], prefill=None, uncached_tokens=uncached(decode))
        prefill_id, decode_id = choose_pair(sides, self.routing, load, view.hosts.__getitem__, turn)
        decode, prefill, policy = self.workers[decode_id], self.workers[prefill_id], self._policy
        transports = pair_transports(view.transports.get(prefill_id, ()), prefill, decode)
        if not transports or uncached(decode_id) < policy.min_prompt_tokens or prefill_id in self._down or (
                policy.max_prefill_queue and self._requests[prefill_id] >= policy.max_prefill_queue):
            return Route(decode=decode, prefill=None, uncached_tokens=uncached(decode_id))
        return Route(decode=decode, prefill=prefill, uncached_tokens=uncached(prefill_id),
                     kv_transports=tuple(transports))

    async def until_paired(self, timeout: float) -> bool:
        """Wait until some prefill worker is paired with a decode worker in this router's view (the
        control plane's table can trail the registry by a watch event); False after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self._current_view().sides(self.workers):
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

    @property
    def pairing_table(self) -> cp_pb.PairingTable | None:
        """The control plane's table as this router last read it; None without a control plane."""
        return self._table

    def metric_samples(self) -> list[metrics.Sample]:
        """Workers by role and the pairs routing may use, for /metrics."""
        view = self._current_view()
        pairs = sum(len(g.prefills) * len(g.decodes) for g in (view.published or view.derived))
        return [*metrics.workers_by_role("dynamo_router_workers", self.workers.values()),
                ("dynamo_router_pairs", {}, float(pairs))]

    def _current_view(self) -> _View:
        if self._view.workers is not self.workers or self._view.table is not self._table:
            self._view = _View.of(self.workers, self._table)
        return self._view

    def _update_load(self, worker_id: str) -> None:
        reported = self._reported.get(worker_id)
        sent = self._in_flight.requests[worker_id]
        if reported is None:
            self._kv_share.pop(worker_id, None)
            if sent:
                self._requests[worker_id] = sent
            else:
                self._requests.pop(worker_id, None)  # idle and unknown: the default, 0
            return
        self._requests[worker_id] = max(sent, reported.active_requests)
        total = reported.total_kv_blocks
        self._kv_share[worker_id] = reported.used_kv_blocks / total if total else 0.0

    def engine_of(self, model: str) -> str:
        """The engine kind serving `model` ("" when none is registered)."""
        return self._engines.get(model, "")

    @contextlib.contextmanager
    def busy(self, worker: pb.WorkerInfo, tokens: int = 0) -> Iterator[None]:
        """Count a request, and the prompt tokens it has to compute there, against a worker while it runs."""
        try:
            with self._in_flight.busy(worker.worker_id, tokens):
                self._update_load(worker.worker_id)
                yield
        finally:
            self._update_load(worker.worker_id)

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
            self._reset_renewed(snapshot)
            self.workers = snapshot
            self._engines = {}
            for worker in snapshot.values():
                self._engines.setdefault(worker.model, worker.engine)
            self._follow_each_worker()
            self._first_snapshot.set()

    def mark_down(self, worker_id: str, for_s: float = DOWN_FOR_S) -> None:
        """A call to the worker failed as if it were gone (refused, reset): route around it for `for_s`, or
        until its record changes (a restart), rather than send every request to it until its lease ends. A
        decode worker is passed by; the decode worker paired with a prefill worker that is down prefills."""
        self._down[worker_id] = time.monotonic() + for_s

    def _excluding_down(self, exclude: Collection[str], candidates: Collection[str]) -> Collection[str]:
        """`exclude` and the workers marked down, unless that leaves none of `candidates` (then trying one
        beats refusing the request)."""
        now = time.monotonic()
        for worker_id, until in list(self._down.items()):
            if until <= now or worker_id not in self.workers:
                del self._down[worker_id]
        more = {*exclude, *self._down}
        return more if any(c not in more for c in candidates) else exclude

    def _reset_renewed(self, snapshot: dict[str, pb.WorkerInfo]) -> None:
        """A worker record new to this view, or changed, is a process (re)started at its endpoint: channels
        to that endpoint may be waiting out a reconnect backoff from the process that was there before, so
        they are made afresh and the next call connects at once, and a mark of it as down ends."""
        for worker_id, worker in snapshot.items():
            before = self.workers.get(worker_id)
            if before is worker or before == worker:
                continue
            self._down.pop(worker_id, None)
            if self._channels.reset(worker.endpoint):
                log.info("fleet: worker %s (re)started at %s; reconnecting to it", worker_id, worker.endpoint)

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
                self._update_load(worker_id)
        for worker_id, worker in self.workers.items():
            if worker_id not in self._feeds and worker.role in (pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE):
                feeds = [asyncio.create_task(self._follow_cache(worker))] if self.routing.uses_prefix_cache else []
                if self._load_poll_s > 0:
                    feeds.append(asyncio.create_task(self._poll_load(worker)))
                self._feeds[worker_id] = (worker.endpoint, feeds)

    async def _poll_load(self, worker: pb.WorkerInfo) -> None:
        """The worker's own count of running requests and used KV blocks, from every router's requests."""
        while True:
            try:
                channel = self._channels.get(worker.endpoint)  # anew each time: it may have been reset
                self._reported[worker.worker_id] = await worker_stats(channel, worker.role,
                                                                      timeout=self._load_poll_s * 4)
            except grpc.aio.AioRpcError:
                self._reported.pop(worker.worker_id, None)  # unreachable: judged by this router's count alone
            self._update_load(worker.worker_id)
            await asyncio.sleep(self._load_poll_s)

    async def _follow_cache(self, worker: pb.WorkerInfo) -> None:
        """Index the worker's cache; a broken feed is dropped from the index and restarted (it begins
        with a full snapshot). A worker whose engine reports no events stays out of the index."""
        delay = 0.5
        while True:
            stub = events_grpc.KvEventServiceStub(self._channels.get(worker.endpoint))  # it may be reset
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
