"""Keeps the pairing table in step with the live fleet and publishes it for routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from dynamo_grpc.registry import PAIRINGS_DOCUMENT, Registry
from dynamo_grpc.routing.pairing import compute_pairings
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

log = logging.getLogger(__name__)


class PairingController:
    """Recomputes pairings on every fleet change; routers read the published table from the registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.table = cp_pb.PairingTable()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

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
                await self._changed.wait_for(lambda: self.table.version != seen)
                table = self.table
            seen = table.version
            yield table

    async def _run(self) -> None:
        async for workers in self._registry.watch_workers():
            table = compute_pairings(workers.values(), version=self.table.version + 1)
            if list(table.pairings) != list(self.table.pairings) or not self._ready.is_set():
                await self._registry.put_document(PAIRINGS_DOCUMENT, table.SerializeToString())
                log.info("pairing table v%d: %d pairs among %d workers", table.version, len(table.pairings),
                         len(workers))
                async with self._changed:
                    self.table = table
                    self._changed.notify_all()
            self._ready.set()
