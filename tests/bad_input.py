"""Requests a client can get wrong, and how each surface must refuse them: the router's gRPC status with its
ErrorInfo reason, and the frontend's HTTP status with its OpenAI error `code`.

Shared by the tests of both engines, so the simulated engine and vLLM are held to the same reasons.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from dynamo_grpc.channels import MAX_MESSAGE_BYTES
from dynamo_grpc.client import GenerateStream, params
from dynamo_grpc.errors import from_rpc_error
from dynamo_grpc.frontend.http import MAX_BODY_BYTES
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import router_pb2_grpc as router_grpc


@dataclass(frozen=True)
class BadInput:
    """One wrong request. `sampling` holds OpenAI body fields, named as in `SamplingParams` too."""

    name: str
    prompt: str | list[int]
    reason: str
    says: tuple[str, ...] = ()
    """What the message must name (a field, the numbers to fix)."""
    sampling: dict[str, Any] = field(default_factory=dict)
    http_code: str = ""
    """The HTTP error `code` when the frontend refuses the request itself; else the reason in lower case."""

    def params(self, model: str) -> pb.GenerationParams:
        p = params(self.prompt, model=model)
        for name, value in self.sampling.items():
            if isinstance(value, list):
                getattr(p.sampling, name).extend(value)
            else:
                setattr(p.sampling, name, value)
        return p

    def body(self, model: str) -> dict[str, Any]:
        return {"model": model, "prompt": self.prompt, **self.sampling}


def bad_inputs(context: int, vocab: int) -> list[BadInput]:
    """The cases for a model with this context length and vocabulary size."""
    over = "hello world " * (context * 2 // 3)  # fewer characters than the context could hold, more tokens
    return [
        BadInput("prompt fills the context", [5] * context, "CONTEXT_TOO_LONG", (str(context),)),
        BadInput("prompt over the context", [5] * (context + 1252), "CONTEXT_TOO_LONG", (str(context),)),
        BadInput("text over the context", over, "CONTEXT_TOO_LONG", (str(context),)),
        BadInput("text far over the context", "x" * 200_000, "CONTEXT_TOO_LONG", (str(context), "200000")),
        BadInput("token id out of vocabulary", [1, 99999, 2], "TOKEN_OUT_OF_VOCABULARY", ("99999", str(vocab))),
        BadInput("stop token id out of vocabulary", "hi", "BAD_SAMPLING_PARAMS", ("stop_token_ids", str(vocab - 1)),
                 {"stop_token_ids": [99999]}),
        BadInput("negative temperature", "hi", "BAD_SAMPLING_PARAMS", ("temperature",), {"temperature": -0.5}),
        BadInput("temperature over 2", "hi", "BAD_SAMPLING_PARAMS", ("temperature",), {"temperature": 7.0}),
        BadInput("temperature NaN", "hi", "BAD_SAMPLING_PARAMS", ("temperature",), {"temperature": math.nan}),
        BadInput("top_p 0", "hi", "BAD_SAMPLING_PARAMS", ("top_p",), {"top_p": 0.0}),
        BadInput("top_p over 1", "hi", "BAD_SAMPLING_PARAMS", ("top_p",), {"top_p": 1.5}),
        BadInput("max_tokens 0", "hi", "BAD_SAMPLING_PARAMS", ("max_tokens",), {"max_tokens": 0},
                 http_code="invalid_request"),
    ]


async def assert_refused_by_router(stub: router_grpc.RouterServiceStub, case: BadInput, model: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await GenerateStream(stub, "", case.params(model)).collect()
    refusal = from_rpc_error(failure.value)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.INVALID_ARGUMENT, case.reason), refusal.message
    assert all(part in refusal.message for part in case.says), refusal.message


async def assert_refused_by_frontend(http: httpx.AsyncClient, case: BadInput, model: str) -> None:
    body = json.dumps(case.body(model))  # NaN included, as Python's json writes it
    response = await http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (400, case.http_code or case.reason.lower()), error
    assert all(part in error["message"] for part in case.says), error["message"]


async def assert_message_limit_holds(endpoint: str, model: str) -> None:
    """A request over the gRPC message limit is RESOURCE_EXHAUSTED from gRPC itself, naming the limit."""
    async with grpc.aio.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 2**28)]) as channel:
        call = GenerateStream(router_grpc.RouterServiceStub(channel), "", params("x" * MAX_MESSAGE_BYTES, model=model))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.collect()
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE_BYTES) in (failure.value.details() or "")


async def assert_body_limits_hold(http: httpx.AsyncClient, model: str) -> None:
    """A body over the HTTP limit is 413 naming the limit: said up front (Content-Length, refused before it
    is read) or streamed (chunked, refused once the limit is passed)."""
    head = json.dumps({"model": model, "prompt": ""})[:-2]
    body = (head + "x" * (MAX_BODY_BYTES + 1 - len(head) - 2) + '"}').encode()

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 2**16):
            yield body[start:start + 2**16]

    for content in (body, chunked()):
        response = await http.post("/v1/completions", content=content,
                                   headers={"Content-Type": "application/json"})
        error = response.json()["error"]
        assert (response.status_code, error["code"]) == (413, "request_too_large"), error
        assert f"{MAX_BODY_BYTES / 2**20:g} MiB" in error["message"], error["message"]
