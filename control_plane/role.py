"""The control-plane role: publish the plan, keep the pairing table (and the scale target), serve
ControlPlaneService."""

from __future__ import annotations

import logging

from control_plane.control_plane_service import ControlPlaneServicer
from control_plane.controller import PairingController
from control_plane.scaling import AutoscalingConfig, ScaleController
from dynamo_grpc import metrics
from dynamo_grpc.config import ServerConfig
from dynamo_grpc.registry import PLAN_DOCUMENT, Registry
from dynamo_grpc.roles import RunningRole, serve, service_name
from dynamo_grpc.services.server import ServiceBinding
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc

log = logging.getLogger(__name__)


async def start_control_plane(config: ServerConfig, registry: Registry, *, plan: cp_pb.Plan | None = None,
                              autoscaling: AutoscalingConfig | None = None) -> RunningRole:
    """`plan` (compiled from a deployment spec) is published for GetPlan and every process to read;
    with `autoscaling`, the control plane also sizes the pools and publishes their scale target."""
    if plan is not None:
        await registry.put_document(PLAN_DOCUMENT, plan.SerializeToString())
    pairings = PairingController(registry)
    await pairings.start()
    cleanups = [metrics.sample(pairings, pairings.metric_samples), pairings.stop]
    if autoscaling is not None:
        scaler = ScaleController(registry, autoscaling, tls=config.tls)
        await scaler.start()
        cleanups[:0] = [metrics.sample(scaler, scaler.metric_samples), scaler.stop]
    server = await serve(config, [
        ServiceBinding(ControlPlaneServicer(registry, pairings), cp_grpc.add_ControlPlaneServiceServicer_to_server,
                       service_name(cp_pb, "ControlPlaneService")),
    ])
    endpoint = config.endpoint(server.port)
    log.info("control plane serving on %s", endpoint)
    return RunningRole("control plane", endpoint, server, registry, cleanups=cleanups)
