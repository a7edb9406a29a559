"""A small Python client for RouterService.Generate (what other languages generate from the protos)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from dynamo_grpc.channels import CHANNEL_OPTIONS
from dynamo_grpc.services.streams import CancelSignal, open_bidi
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import router_pb2 as router_pb
from dynamo_grpc.v1 import router_pb2_grpc as router_grpc


@dataclass
class GenerateResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    completion: pb.Completion | None = None


class GenerateStream:
    """One running request: iterate for responses, `cancel()` to stop it server-side.

    `cancel()` sends the cancel in-band for as long as the call runs, read or not; reading on shows the
    router's CANCELLED completion. Leaving a loop over the stream early (break, an exception, a cancelled
    task) closes its iterator, and that cancels the call: the router and the workers stop the request and
    free its KV instead of generating for nobody. To stop reading for a while, hold one iterator
    (`responses = aiter(stream)`) and resume it.
    """

    def __init__(self, stub: router_grpc.RouterServiceStub, request_id: str, params: pb.GenerationParams, *,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self._cancel = CancelSignal()
        self.call = open_bidi(
            stub.Generate if metadata is None else functools.partial(stub.Generate, metadata=metadata),
            router_pb.GenerateRequest(request_id=request_id, start=params),
            router_pb.GenerateRequest(request_id=request_id, cancel=pb.CancelAction(reason="client cancel")),
            self._cancel)

    def cancel(self) -> None:
        self._cancel.set()

    async def __aiter__(self) -> AsyncIterator[router_pb.GenerateResponse]:
        try:
            async for response in self.call:
                yield response
        finally:
            self.call.cancel()  # a no-op once the call has ended; else nobody reads the rest

    async def collect(self) -> GenerateResult:
        result = GenerateResult()
        async for response in self:
            if response.HasField("tokens"):
                result.token_ids.extend(response.tokens.token_ids)
                result.text += response.tokens.text
            else:
                result.completion = response.completion
        return result


class RouterClient:
    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self.stub = router_grpc.RouterServiceStub(self.channel)

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    def generate(self, prompt: str | list[int], *, model: str, request_id: str = "", max_tokens: int = 16,
                 temperature: float = 0.0, ignore_eos: bool = False) -> GenerateStream:
        return GenerateStream(self.stub, request_id, params(prompt, model=model, max_tokens=max_tokens,
                                                            temperature=temperature, ignore_eos=ignore_eos))


def params(prompt: str | list[int], *, model: str, max_tokens: int = 16, temperature: float = 0.0,
           ignore_eos: bool = False) -> pb.GenerationParams:
    form = pb.Prompt(text=prompt) if isinstance(prompt, str) else pb.Prompt(token_ids=pb.TokenIds(ids=prompt))
    return pb.GenerationParams(model=model, prompt=form, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
