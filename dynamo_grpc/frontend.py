"""OpenAI-compatible HTTP frontend: /v1/completions and /v1/chat/completions over RouterService.Generate.

Every HTTP request becomes one Generate stream. A client that disconnects cancels its request end to
end (the router stops decode and frees KV on both workers), so an abandoned request costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from dynamo_grpc.client import GenerateStream, RouterClient
from dynamo_grpc.errors import from_rpc_error
from dynamo_grpc.openai_protocol import (
    BadRequest,
    Job,
    choice,
    envelope,
    error_body,
    finish_reason_of,
    http_status,
    parse_job,
    usage_of,
)
from dynamo_grpc.registry import SCALE_DOCUMENT, Registry, RegistryUnavailable
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import router_pb2 as router_pb

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"; only ever seen in /metrics
ABANDONED_GRACE_S = 30.0  # how long a cancelled request may take to wind down before its call is cut
MAX_BODY_BYTES = 64 * 2**20  # token-id prompts are large JSON
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The few series an operator needs, in Prometheus text format (no client library needed)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.generated_tokens = 0
        self.in_flight = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS_S)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def observe_ttft(self, seconds: float) -> None:
        for i, bound in enumerate(TTFT_BUCKETS_S):
            if seconds <= bound:
                self.ttft_buckets[i] += 1
        self.ttft_sum += seconds
        self.ttft_count += 1

    def render(self) -> str:
        lines = ["# HELP dynamo_frontend_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE dynamo_frontend_requests_total counter"]
        lines += [f'dynamo_frontend_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                  for (endpoint, status), count in sorted(self.requests.items())]
        lines += ["# HELP dynamo_frontend_generated_tokens_total Tokens sent back to clients.",
                  "# TYPE dynamo_frontend_generated_tokens_total counter",
                  f"dynamo_frontend_generated_tokens_total {self.generated_tokens}",
                  "# HELP dynamo_frontend_inflight_requests Generation requests being served now.",
                  "# TYPE dynamo_frontend_inflight_requests gauge",
                  f"dynamo_frontend_inflight_requests {self.in_flight}",
                  "# HELP dynamo_frontend_time_to_first_token_seconds From request to first token.",
                  "# TYPE dynamo_frontend_time_to_first_token_seconds histogram"]
        lines += [f'dynamo_frontend_time_to_first_token_seconds_bucket{{le="{bound}"}} {count}'
                  for bound, count in zip(TTFT_BUCKETS_S, self.ttft_buckets)]
        lines += [f'dynamo_frontend_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
                  f"dynamo_frontend_time_to_first_token_seconds_sum {self.ttft_sum}",
                  f"dynamo_frontend_time_to_first_token_seconds_count {self.ttft_count}"]
        return "\n".join(lines) + "\n"


class _Relay:
    """Reads a Generate stream in its own task.

    A disconnect cancels the HTTP handler wherever it waits; were that a gRPC read, the call would be
    torn down instead of cancelled in-band. Here the handler only waits on a queue, and an abandoned
    stream keeps being read until the router confirms the cancel.
    """

    def __init__(self, stream: GenerateStream, tasks: set[asyncio.Task[None]]) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[router_pb.GenerateResponse | BaseException | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())
        tasks.add(self._task)
        self._task.add_done_callback(tasks.discard)

    async def _pump(self) -> None:
        try:
            async for response in self._stream:
                self._queue.put_nowait(response)
            self._queue.put_nowait(None)
        except Exception as error:  # noqa: BLE001 - handed to the reader
            self._queue.put_nowait(error)

    async def next(self) -> router_pb.GenerateResponse | None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def abandon(self) -> None:
        if self._task.done():
            return
        self._stream.cancel()
        timer = asyncio.get_running_loop().call_later(ABANDONED_GRACE_S, self._stream.call.cancel)
        self._task.add_done_callback(lambda _: timer.cancel())


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None,
           param: str | None = None) -> web.Response:
    return _json_response(status, error_body(status, message, code, param), headers)


def _rpc_error_body(error: grpc.aio.AioRpcError) -> tuple[int, dict[str, Any]]:
    failure = from_rpc_error(error)
    status = http_status(failure.code, failure.reason)
    return status, error_body(status, failure.message, failure.reason.lower())


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


class Frontend:
    """The HTTP handlers; one RouterClient channel carries every request."""

    def __init__(self, router_endpoint: str, registry: Registry, chat_template: str | None = None) -> None:
        self.client = RouterClient(router_endpoint)
        self.registry = registry
        self.chat_template = chat_template
        self.metrics = Metrics()
        self.relays: set[asyncio.Task[None]] = set()
        self.app = web.Application(middlewares=[self._count_and_shape_errors], client_max_size=MAX_BODY_BYTES)
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics_text),
        ])

    @web.middleware
    async def _count_and_shape_errors(self, request: web.Request,
                                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                      ) -> web.StreamResponse:
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "other"  # unknown paths share one series
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return _error(status, f"the request body is over this server's limit of {MAX_BODY_BYTES / 2**20:g} MiB; "
                          "shorten the prompt", "request_too_large")
        except web.HTTPException as error:  # aiohttp's own 404/405, in OpenAI's error shape
            status = error.status
            return _error(error.status, error.reason, error.reason.lower().replace(" ", "_"))
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        finally:
            self.metrics.requests[(endpoint, status)] += 1

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        headers = {REQUEST_ID_HEADER: request_id}
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"the request body is not valid JSON: {error}", "invalid_json", headers)
        try:
            job = parse_job(body, chat=chat, chat_template=self.chat_template)
        except BadRequest as error:
            return _error(400, error.message, "invalid_request", headers, error.param)

        started = time.monotonic()
        relay = _Relay(GenerateStream(self.client.stub, request_id, job.params), self.relays)
        self.metrics.in_flight += 1
        try:
            try:
                first = await relay.next()
            except grpc.aio.AioRpcError as error:
                status, error_json = _rpc_error_body(error)
                return _json_response(status, error_json, headers)
            responses = self._counted(relay, first, started)
            if job.stream:
                return await self._stream(request, job, request_id, responses, headers)
            return await self._whole(job, request_id, responses, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            log.info("request %s: client went away; cancelling it", request_id)
            relay.abandon()
            raise
        finally:
            self.metrics.in_flight -= 1

    async def _counted(self, relay: _Relay, first: router_pb.GenerateResponse | None, started: float
                       ) -> AsyncIterator[router_pb.GenerateResponse]:
        """The responses, recording time to first token and tokens generated on the way."""
        response, seen_tokens = first, False
        while response is not None:
            if response.HasField("tokens") and response.tokens.token_ids:
                if not seen_tokens:
                    self.metrics.observe_ttft(time.monotonic() - started)
                    seen_tokens = True
                self.metrics.generated_tokens += len(response.tokens.token_ids)
            yield response
            response = await relay.next()

    async def _whole(self, job: Job, request_id: str, responses: AsyncIterator[router_pb.GenerateResponse],
                     headers: dict[str, str]) -> web.Response:
        text, token_ids, completion = "", [], pb.Completion()
        try:
            async for response in responses:
                if response.HasField("tokens"):
                    text += response.tokens.text
                    token_ids += response.tokens.token_ids
                else:
                    completion = response.completion
        except grpc.aio.AioRpcError as error:
            status, error_json = _rpc_error_body(error)
            return _json_response(status, error_json, headers)
        body = envelope(job, request_id, [choice(job, text=text, token_ids=token_ids, streaming=False,
                                                 finish_reason=finish_reason_of(completion))],
                        streaming=False, usage=usage_of(completion))
        return _json_response(200, body, headers)

    async def _stream(self, request: web.Request, job: Job, request_id: str,
                      responses: AsyncIterator[router_pb.GenerateResponse], headers: dict[str, str]
                      ) -> web.StreamResponse:
        """Server-sent events: a chunk per token batch, a finish chunk, optionally usage, then [DONE]."""
        http = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await http.prepare(request)

        async def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
            await http.write(_sse(envelope(job, request_id, choices, streaming=True, usage=usage)))

        if job.chat:
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}])
        try:
            completion = pb.Completion()
            async for response in responses:
                if response.HasField("tokens"):
                    await send([choice(job, text=response.tokens.text, token_ids=list(response.tokens.token_ids),
                                       finish_reason=None, streaming=True)])
                else:
                    completion = response.completion
            await send([choice(job, text=None, token_ids=[], finish_reason=finish_reason_of(completion),
                               streaming=True)])
            if job.include_usage:
                await send([], usage=usage_of(completion))
        except grpc.aio.AioRpcError as error:  # too late for an HTTP status: the error goes in the stream
            await http.write(_sse(_rpc_error_body(error)[1]))
        await http.write(b"data: [DONE]\n\n")
        await http.write_eof()
        return http

    async def models(self, request: web.Request) -> web.Response:
        try:
            workers = await self.registry.list_workers(pb.WORKER_ROLE_DECODE)
        except RegistryUnavailable as error:
            return _error(503, f"the worker registry is unreachable: {error}", "registry_unavailable")
        created: dict[str, int] = {}
        for worker in workers:
            started = worker.started_at.seconds
            created[worker.model] = min(created.get(worker.model, started), started)
        return _json_response(200, {"object": "list", "data": [
            {"id": model, "object": "model", "created": at, "owned_by": "dynamo-grpc"}
            for model, at in sorted(created.items())]})

    async def health(self, request: web.Request) -> web.Response:
        """Ready once a decode worker is registered: without one every generation request fails, unless
        the deployment autoscales (then the next request starts one, and a balancer must keep sending)."""
        try:
            decode_workers = await self.registry.list_workers(pb.WORKER_ROLE_DECODE)
            autoscaled = not decode_workers and await self.registry.get_document(SCALE_DOCUMENT) is not None
        except RegistryUnavailable as error:
            return _json_response(503, {"status": "unhealthy", "reason": f"registry unreachable: {error}"})
        if autoscaled:
            return _json_response(200, {"status": "scaled_to_zero", "decode_workers": 0,
                                        "reason": "the next request starts a decode worker (cold start)"})
        if not decode_workers:
            return _json_response(503, {"status": "unhealthy", "reason": "no decode worker is registered"})
        return _json_response(200, {"status": "healthy", "decode_workers": len(decode_workers)})

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})


@dataclass
class RunningFrontend:
    """A serving frontend; `stop()` closes connections (cancelling what they ran) and the router channel."""

    frontend: Frontend
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.frontend.relays:  # cancelled requests winding down at the router
            await asyncio.wait(set(self.frontend.relays), timeout=5.0)
        for task in set(self.frontend.relays):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.frontend.client.channel.close()


async def start_frontend(router_endpoint: str, registry: Registry, *, host: str, port: int,
                         chat_template: str | None = None) -> RunningFrontend:
    """Serve the OpenAI API on host:port (0 picks a free port) in front of the router at `router_endpoint`."""
    frontend = Frontend(router_endpoint, registry, chat_template)
    # handler_cancellation: a disconnect cancels the handler at once, not at its next write.
    runner = web.AppRunner(frontend.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await frontend.client.channel.close()
        raise
    bound = runner.addresses[0][1]
    log.info("OpenAI frontend serving on http://%s:%d (router %s)", host, bound, router_endpoint)
    return RunningFrontend(frontend, runner, host, bound)
