"""Keeps the pairing table in step with the live fleet and publishes it for routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from dynamo_grpc import metrics
from dynamo_grpc.registry import PAIRINGS_DOCUMENT, Registry, RegistryUnavailable
from dynamo_grpc.routing.pairing import pairing_table, unpaired
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRY_S = 0.5


class PairingController:
    """Recomputes pairings on every fleet change; routers read the published table from the registry.

    The table is computed from the newest snapshot of the fleet: changes that arrive while a table is
    being written are folded into the next one, so a burst (a host's workers leaving at once) costs a
    write or two, not one per worker.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.table = cp_pb.PairingTable()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._changes = metrics.pairing_changes()
        self.workers: dict[str, pb.WorkerInfo] = {}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await self._ready.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def watch(self) -> AsyncIterator[cp_pb.PairingTable]:
        """The current table, then each new version."""
        seen = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self.table.version != seen)
                table = self.table
            seen = table.version
            yield table

    async def _run(self) -> None:
        async with contextlib.aclosing(newest_only(self._registry.watch_workers())) as fleets:
            async for workers in fleets:
                await self._publish(workers)
                self._ready.set()

    async def _publish(self, workers: dict[str, pb.WorkerInfo]) -> None:
        """Write the table for this fleet, unless it pairs the workers as the current one does."""
        self.workers = workers
        table = pairing_table(workers.values(), version=self.table.version + 1)
        if self._ready.is_set() and list(table.groups) == list(self.table.groups) \
                and list(table.pairings) == list(self.table.pairings):
            return
        while True:
            try:
                await self._registry.put_document(PAIRINGS_DOCUMENT, table.SerializeToString())
                break
            except RegistryUnavailable as error:
                log.warning("pairing table v%d not published (%s); retrying in %.1f s", table.version, error,
                            _RETRY_S)
                await asyncio.sleep(_RETRY_S)
        pairs = sum(len(g.prefill_worker_ids) * len(g.decode_worker_ids) for g in table.groups)
        log.info("pairing table v%d: %d pairs in %d groups among %d workers", table.version, pairs,
                 len(table.groups), len(workers))
        for reason in unpaired(workers.values()):
            log.warning("pairing table v%d: %s", table.version, reason)
        self._changes.inc()
        async with self._changed:
            self.table = table
            self._changed.notify_all()

    def metric_samples(self) -> list[metrics.Sample]:
        """The fleet and the published table, for /metrics."""
        pairs = sum(len(g.prefill_worker_ids) * len(g.decode_worker_ids) for g in self.table.groups)
        return [*metrics.workers_by_role("dynamo_control_plane_workers", self.workers.values()),
                ("dynamo_control_plane_pairs", {}, float(pairs)),
                ("dynamo_control_plane_pairing_version", {}, float(self.table.version))]


async def newest_only(source: AsyncGenerator[T, None]) -> AsyncIterator[T]:
    """The items of `source`, less those a newer one replaced while the consumer was busy with an older."""
    newest: list[T] = []
    arrived = asyncio.Event()
    ended = False

    async def pump() -> None:
        nonlocal ended
        try:
            async with contextlib.aclosing(source) as items:
                async for item in items:
                    newest[:] = [item]
                    arrived.set()
        finally:
            ended = True
            arrived.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            if not newest and not ended:
                arrived.clear()
                await arrived.wait()
            if newest:
                yield newest.pop()
            elif ended:
                await task  # raises what ended the source
                return
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
