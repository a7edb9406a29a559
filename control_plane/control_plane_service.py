"""ControlPlaneService: read and watch the fleet, the plan and the pairing table."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from control_plane.controller import PairingController
from dynamo_grpc.errors import InvalidArgument
from dynamo_grpc.registry import PLAN_DOCUMENT, SCALE_DOCUMENT, Registry
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc


class ControlPlaneServicer(cp_grpc.ControlPlaneServiceServicer):
    def __init__(self, registry: Registry, pairings: PairingController) -> None:
        self._registry = registry
        self._pairings = pairings

    async def ListWorkers(self, request: cp_pb.ListWorkersRequest, context: grpc.aio.ServicerContext
                          ) -> cp_pb.ListWorkersResponse:
        if request.role not in pb.WorkerRole.values():
            raise InvalidArgument(f"role {request.role} is not a WorkerRole; roles are "
                                  f"{', '.join(pb.WorkerRole.keys())}", reason="BAD_ROLE")
        workers = await self._registry.list_workers(request.role)
        return cp_pb.ListWorkersResponse(workers=[w for w in workers if not request.model or w.model == request.model])

    async def GetPlan(self, request: cp_pb.GetPlanRequest, context: grpc.aio.ServicerContext
                      ) -> cp_pb.GetPlanResponse:
        data = await self._registry.get_document(PLAN_DOCUMENT)
        return cp_pb.GetPlanResponse(plan=cp_pb.Plan.FromString(data) if data else cp_pb.Plan())

    async def GetPairings(self, request: cp_pb.GetPairingsRequest, context: grpc.aio.ServicerContext
                          ) -> cp_pb.GetPairingsResponse:
        return cp_pb.GetPairingsResponse(table=self._pairings.table)

    async def WatchPairings(self, request: cp_pb.WatchPairingsRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[cp_pb.WatchPairingsResponse]:
        async for table in self._pairings.watch():
            yield cp_pb.WatchPairingsResponse(table=table)

    async def GetScaleTarget(self, request: cp_pb.GetScaleTargetRequest, context: grpc.aio.ServicerContext
                             ) -> cp_pb.GetScaleTargetResponse:
        data = await self._registry.get_document(SCALE_DOCUMENT)
        return cp_pb.GetScaleTargetResponse(target=cp_pb.ScaleTarget.FromString(data) if data else None)
