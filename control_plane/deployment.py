"""A whole deployment on one host, in one process: what `dynamo-grpc serve` runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from control_plane.role import start_control_plane
from dynamo_grpc.config import WorkerConfig
from dynamo_grpc.registry import Registry
from dynamo_grpc.roles import RunningRole, start_decode, start_prefill, start_router

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    """Every role of a one-host deployment, started in dependency order and stopped in reverse."""

    control_plane: RunningRole
    prefill: RunningRole
    decode: RunningRole
    router: RunningRole

    async def stop(self) -> None:
        for role in (self.router, self.decode, self.prefill, self.control_plane):
            await role.stop()


async def start_all_in_one(worker: WorkerConfig, registry: Registry, **router_settings: Any) -> Deployment:
    """Control plane, one prefill and one decode worker on free ports, and the router on `worker.server.port`
    (`router_settings` as `start_router` takes them)."""
    internal = dataclasses.replace(worker.server, port=0)
    started: list[RunningRole] = []
    try:
        started.append(await start_control_plane(internal, registry))
        # Engines start side by side: each spends much of its start-up in its own processes.
        workers = await asyncio.gather(start_prefill(dataclasses.replace(worker, server=internal), registry),
                                       start_decode(dataclasses.replace(worker, server=internal), registry),
                                       return_exceptions=True)
        started += [role for role in workers if isinstance(role, RunningRole)]
        for failure in workers:
            if isinstance(failure, BaseException):
                raise failure
        router = await start_router(worker.server, registry, **router_settings)
        started.append(router)
        # Ready means disaggregated from the first request on.
        if router.fleet is not None and not await router.fleet.until_paired(timeout=10.0):
            log.warning("the router sees no prefill/decode pair yet; requests prefill on the decode worker")
    except BaseException:
        for role in reversed(started):
            await role.stop()
        raise
    return Deployment(*started)
