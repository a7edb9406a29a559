"""Starting and stopping each role: build its parts, serve them, register, and undo it all in order.

Shutdown order: report NOT_SERVING -> leave the registry (routers stop picking us) -> stop the
server with a grace period for in-flight calls -> shut the engine down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from dynamo_grpc import metrics
from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.config import ConfigError, EndpointPickerConfig, ServerConfig, WorkerConfig
from dynamo_grpc.engine.base import Engine
from dynamo_grpc.engine.registry import EngineParts
from dynamo_grpc.kv.nixl_transport import NixlAgent
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import KvReceiver, layout_bytes
from dynamo_grpc.kv.wire import add_kv_transfer_service
from dynamo_grpc.registry import Registry
from dynamo_grpc.routing.fleet import Fleet
from dynamo_grpc.routing.router import Router, open_router
from dynamo_grpc.services.decode_service import DecodeServicer
from dynamo_grpc.services.kv_event_service import KvEventServicer
from dynamo_grpc.services.kv_transfer_service import KvTransferServicer
from dynamo_grpc.services.prefill_service import PrefillServicer
from dynamo_grpc.services.router_service import RouterServicer
from dynamo_grpc.services.server import RunningServer, ServiceBinding, start_server
from dynamo_grpc.tiny_model import DEFAULT_MODEL_DIR, build_tiny_model, is_complete
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import kv_events_pb2 as events_pb
from dynamo_grpc.v1 import kv_events_pb2_grpc as events_grpc
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from dynamo_grpc.v1 import router_pb2 as router_pb
from dynamo_grpc.v1 import router_pb2_grpc as router_grpc

log = logging.getLogger(__name__)

GRACE_S = 5.0


async def serve(config: ServerConfig, bindings: list[ServiceBinding], *, starting: tuple[str, ...] = (),
                token: str | None = None) -> RunningServer:
    """`start_server` where `config` says, with its TLS and reflection."""
    return await start_server(bindings, host=config.host, port=config.port, starting=starting, tls=config.tls,
                              token=token, reflection=config.reflection)


def service_name(module: object, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name  # type: ignore[attr-defined]


@dataclass
class RunningRole:
    """A started role; `stop()` undoes everything `start_*` did, in reverse."""

    name: str
    endpoint: str
    server: RunningServer
    registry: Registry
    worker_id: str = ""
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    router: Router | None = None
    """A router role's router, which an HTTP frontend in the same process may share."""

    @property
    def fleet(self) -> Fleet | None:
        """A router's view of the fleet."""
        return self.router.fleet if self.router is not None else None

    async def stop(self) -> None:
        await self.server.health.enter_graceful_shutdown()
        if self.worker_id:
            await self.registry.deregister(self.worker_id)
        await self.server.stop(GRACE_S)
        for cleanup in self.cleanups:
            await cleanup()
        log.info("%s stopped", self.name)


async def start_engine(config: WorkerConfig, parts: EngineParts) -> Engine:
    """The worker's engine; a prefill engine gets the KV store, a decode engine the receiver of KV."""
    kind = config.kind
    model_path = kind.model_path(config.engine)
    if model_path == str(DEFAULT_MODEL_DIR) and not is_complete(DEFAULT_MODEL_DIR):
        log.info("building the tiny local model in %s (first run only, a few seconds)", DEFAULT_MODEL_DIR)
        await asyncio.to_thread(build_tiny_model, DEFAULT_MODEL_DIR)
    log.info("starting the %s engine%s", kind.name, f" on {model_path}" if model_path else "")
    return await kind.start(config.engine, parts)


def _kv_events(engine: Engine) -> list[ServiceBinding]:
    """Every worker tells routers what its prefix cache holds, when its engine reports it."""
    if engine.kv_events is None:
        return []
    return [ServiceBinding(KvEventServicer(engine.kv_events), events_grpc.add_KvEventServiceServicer_to_server,
                           service_name(events_pb, "KvEventService"))]


def _sample_engine(role: str, worker_id: str, engine: Engine) -> Callable[[], Awaitable[None]]:
    """Show the engine's load and caches at every scrape of /metrics, until the returned cleanup runs."""
    return metrics.sample(engine, metrics.worker_samples(role, worker_id, engine.stats))


def _worker_info(worker_id: str, role: int, engine: Engine, endpoint: str, config: WorkerConfig
                 ) -> pb.WorkerInfo:
    started = timestamp_pb2.Timestamp()
    started.GetCurrentTime()
    transports = [pb.KvTransport.Value(f"KV_TRANSPORT_{name.upper()}")
                  for name in config.resolved_kv_transports]
    return pb.WorkerInfo(worker_id=worker_id, role=role, model=engine.model, endpoint=endpoint,
                         host=config.server.node_name, engine_fingerprint=engine.fingerprint,
                         capacity=engine.capacity(), started_at=started, engine=engine.kind,
                         kv_transports=transports)


def _nixl_agent(config: WorkerConfig) -> NixlAgent | None:
    return NixlAgent() if "nixl" in config.resolved_kv_transports else None


async def _start_worker(config: WorkerConfig, parts: EngineParts,
                        services: Callable[[Engine], list[ServiceBinding]], starting: tuple[str, ...]
                        ) -> tuple[RunningServer, Engine]:
    """Open the worker's port first, its services NOT_SERVING, then start the engine and serve them:
    probes and balancers get an answer while the engine loads."""
    server = await serve(config.server, [], starting=(*starting, service_name(events_pb, "KvEventService")))
    try:
        engine = await start_engine(config, parts)
    except BaseException:
        await server.stop(0)
        raise
    await server.serve_late([*services(engine), *_kv_events(engine)])
    return server, engine


async def start_prefill(config: WorkerConfig, registry: Registry) -> RunningRole:
    nixl = _nixl_agent(config)
    store = LeasedKvStore(endpoint="", host=config.server.node_name, ttl_s=config.kv_ttl_s, nixl=nixl,
                          nixl_min_bytes=config.nixl_min_bytes, key=config.kv_key)
    worker_id = config.resolved_worker_id("prefill")
    server, engine = await _start_worker(config, EngineParts(kv_store=store), lambda engine: [
        ServiceBinding(PrefillServicer(engine, worker_id=worker_id, store=_limited(store, engine, config)),
                       prefill_grpc.add_PrefillServiceServicer_to_server,
                       service_name(prefill_pb, "PrefillService")),
        ServiceBinding(KvTransferServicer(store), add_kv_transfer_service,
                       service_name(kv_pb, "KvTransferService")),
    ], starting=(service_name(prefill_pb, "PrefillService"), service_name(kv_pb, "KvTransferService")))
    endpoint = store.endpoint = config.server.endpoint(server.port)
    await registry.register(_worker_info(worker_id, pb.WORKER_ROLE_PREFILL, engine, endpoint, config))
    log.info("prefill worker %s serving %s on %s", worker_id, engine.model, endpoint)

    async def close_store() -> None:
        store.close()
        if nixl is not None:
            nixl.close()

    return RunningRole("prefill worker", endpoint, server, registry, worker_id,
                       [_sample_engine("prefill", worker_id, engine), engine.shutdown, close_store])


def _limited(store: LeasedKvStore, engine: Engine, config: WorkerConfig) -> LeasedKvStore:
    """The store, its unpulled transfers limited to shares of the engine's KV pool."""
    capacity = engine.capacity()
    pool_bytes = capacity.kv_blocks * layout_bytes(engine.layout(capacity.block_size))
    store.set_limits(pool_bytes=pool_bytes, held_fraction=config.kv_held_fraction,
                     caller_fraction=config.kv_caller_fraction)
    return store


async def start_decode(config: WorkerConfig, registry: Registry) -> RunningRole:
    channels = ChannelPool(config.server.tls)
    nixl = _nixl_agent(config)
    worker_id = config.resolved_worker_id("decode")
    parts = EngineParts(kv_receiver=KvReceiver.over_network(
        channels, host=config.server.node_name, names=config.resolved_kv_transports, nixl=nixl,
        key=config.kv_key, timeout_s=config.kv_pull_timeout_s, min_mib_s=config.kv_pull_min_mib_s))
    server, engine = await _start_worker(config, parts, lambda engine: [
        ServiceBinding(DecodeServicer(engine, worker_id=worker_id, local_prefill_on_pull_failure=
                                      config.kv_pull_failure == "local-prefill",
                                      stream_interval_s=config.stream_interval_ms / 1e3),
                       decode_grpc.add_DecodeServiceServicer_to_server,
                       service_name(decode_pb, "DecodeService")),
    ], starting=(service_name(decode_pb, "DecodeService"),))
    endpoint = config.server.endpoint(server.port)
    await registry.register(_worker_info(worker_id, pb.WORKER_ROLE_DECODE, engine, endpoint, config))
    log.info("decode worker %s serving %s on %s", worker_id, engine.model, endpoint)

    async def close_transports() -> None:
        await channels.close()
        if nixl is not None:
            nixl.close()

    return RunningRole("decode worker", endpoint, server, registry, worker_id,
                       [_sample_engine("decode", worker_id, engine), engine.shutdown, close_transports])


async def start_router(config: ServerConfig, registry: Registry, *,
                       ext_proc: EndpointPickerConfig | None = None, **settings: Any) -> RunningRole:
    """RouterService on `config`'s port, over a router following `registry` (`settings` as `open_router`
    takes them); with `ext_proc`, also the endpoint picker for Envoy-based gateways on a port of its own."""
    router = await open_router(registry, tls=config.tls, **settings)
    server = await serve(config, [
        ServiceBinding(RouterServicer(router), router_grpc.add_RouterServiceServicer_to_server,
                       service_name(router_pb, "RouterService")),
    ], token=config.auth_token)
    endpoint = config.endpoint(server.port)
    log.info("router serving on %s (%d workers known)", endpoint, len(router.fleet.workers))
    cleanups: list[Callable[[], Awaitable[None]]] = [router.close]
    if ext_proc is not None:
        picker = await _start_endpoint_picker(router, config, ext_proc, str(settings.get("tokenizer") or ""))
        cleanups.insert(0, picker.stop)
    return RunningRole("router", endpoint, server, registry, cleanups=cleanups, router=router)


async def _start_endpoint_picker(router: Router, config: ServerConfig, ext_proc: EndpointPickerConfig,
                                 model_dir: str) -> RunningServer:
    try:
        from dynamo_grpc.frontend.openai_protocol import load_chat_template
        from dynamo_grpc.services.endpoint_picker import SERVICE_NAME, EndpointPicker, add_to_server
    except ImportError as error:
        raise ConfigError(f"--ext-proc-port needs Envoy's API stubs ({error}): "
                          "pip install 'dynamo-grpc[mesh]'") from None
    picker = EndpointPicker(router, target_port=ext_proc.target_port,
                            chat_template=load_chat_template(model_dir) if model_dir else None)
    server = await serve(dataclasses.replace(config, port=ext_proc.port),
                         [ServiceBinding(picker, add_to_server, SERVICE_NAME)])
    log.info("endpoint picker (Envoy ext_proc) serving on %s, picking frontends on port %d",
             config.endpoint(server.port), ext_proc.target_port)
    return server
