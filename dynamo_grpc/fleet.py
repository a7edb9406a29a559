"""The router's live view of the fleet: workers from the registry, pairings from the control plane."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass

from control_plane.pairing import compute_pairings
from dynamo_grpc.errors import NotFound, Unavailable
from dynamo_grpc.registry import Registry
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

log = logging.getLogger(__name__)

PAIRINGS_DOCUMENT = "pairings"
_MAX_RETRY_S = 10.0


@dataclass(frozen=True)
class DisaggregationPolicy:
    """When a request with a paired prefill worker still prefills on its decode worker."""

    min_prompt_tokens: int = 0
    """Shorter prompts prefill locally: moving their KV costs more than it saves. 0: always disaggregate."""
    max_prefill_queue: int = 0
    """A prefill worker with this many requests in flight from this router is saturated. 0: no limit."""


ALWAYS_DISAGGREGATE = DisaggregationPolicy()


@dataclass(frozen=True)
class Route:
    """Where one request runs; no prefill worker means the decode worker prefills locally."""

    decode: pb.WorkerInfo
    prefill: pb.WorkerInfo | None


class Fleet:
    """Follows the registry and picks the least-loaded compatible pair per request.

    Pairings come from the control plane's published table when there is one; without a control
    plane, the router derives the same table itself, so a router works standalone.
    """

    def __init__(self, registry: Registry, policy: DisaggregationPolicy = ALWAYS_DISAGGREGATE) -> None:
        self._registry = registry
        self._policy = policy
        self.workers: dict[str, pb.WorkerInfo] = {}
        self._table: cp_pb.PairingTable | None = None
        self._in_flight: Counter[str] = Counter()
        self._tie_breaker = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._first_snapshot = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_following("workers", self._follow_workers)),
                       asyncio.create_task(self._keep_following("pairings", self._follow_pairings))]
        await self._first_snapshot.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def route(self, model: str, request_id: str, *, prompt_tokens: int = 0, exclude: Collection[str] = ()) -> Route:
        """The pair for a request; `exclude` names decode workers that just failed it. A short prompt, or a
        saturated prefill worker, keeps the prefill on the decode worker (conditional disaggregation)."""
        decodes = {w.worker_id: w for w in self.workers.values()
                   if w.role == pb.WORKER_ROLE_DECODE and w.model == model and w.worker_id not in exclude}
        if not decodes:
            served = sorted({w.model for w in self.workers.values() if w.role == pb.WORKER_ROLE_DECODE})
            if not served:
                raise Unavailable("no decode workers are registered; start one with `dynamo-grpc decode`",
                                  request_id=request_id, reason="NO_WORKERS")
            raise NotFound(f"model {model!r} is not served; served models: {', '.join(served)}",
                           request_id=request_id, reason="MODEL_NOT_FOUND")
        table = self._table if self._table is not None else compute_pairings(self.workers.values())
        pairs = [p for p in table.pairings if p.decode_worker_id in decodes and p.prefill_worker_id in self.workers]
        if not pairs:
            decode = min(decodes.values(), key=lambda w: (self._in_flight[w.worker_id], next(self._tie_breaker)))
            return Route(decode=decode, prefill=None)
        best = min(pairs, key=lambda p: (self._in_flight[p.decode_worker_id] + self._in_flight[p.prefill_worker_id],
                                         not p.same_host, next(self._tie_breaker)))
        policy = self._policy
        if prompt_tokens < policy.min_prompt_tokens or (
                policy.max_prefill_queue and self._in_flight[best.prefill_worker_id] >= policy.max_prefill_queue):
            return Route(decode=decodes[best.decode_worker_id], prefill=None)
        return Route(decode=decodes[best.decode_worker_id], prefill=self.workers[best.prefill_worker_id])

    @contextlib.contextmanager
    def busy(self, worker: pb.WorkerInfo) -> Iterator[None]:
        """Count a request against a worker while it runs there."""
        self._in_flight[worker.worker_id] += 1
        try:
            yield
        finally:
            self._in_flight[worker.worker_id] -= 1

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
            self._first_snapshot.set()

    async def _follow_pairings(self) -> None:
        async for data in self._registry.watch_document(PAIRINGS_DOCUMENT):
            self._table = None if data is None else cp_pb.PairingTable.FromString(data)
