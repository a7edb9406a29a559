"""OpenAI-compatible HTTP frontend: /v1/completions and /v1/chat/completions over RouterService.Generate.

Every HTTP request becomes one Generate stream per choice (`n`). A client that disconnects cancels its
request end to end (the router stops decode and frees KV on both workers), so an abandoned request costs
nothing.
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
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from dynamo_grpc.client import GenerateStream, RouterClient
from dynamo_grpc.errors import from_rpc_error
from dynamo_grpc.frontend.openai_protocol import (
    BadRequest,
    Job,
    choice,
    envelope,
    error_body,
    finish_reason_of,
    http_status,
    logprobs_of,
    parse_job,
    usage_of,
)
from dynamo_grpc.registry import SCALE_DOCUMENT, Registry, RegistryUnavailable
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import router_pb2 as router_pb

log = logging.getLogger(__name__)

Response = router_pb.GenerateResponse
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


class _Relays:
    """Reads the Generate streams of one HTTP request (one per choice), each in its own task, into one queue.

    A disconnect cancels the HTTP handler wherever it waits; were that a gRPC read, the call would be
    torn down instead of cancelled in-band. Here the handler only waits on a queue, and an abandoned
    stream keeps being read until the router confirms the cancel.
    """

    def __init__(self, streams: list[GenerateStream], tasks: set[asyncio.Task[None]]) -> None:
        self._streams = streams
        self._queue: asyncio.Queue[tuple[int, Response | BaseException | None]] = asyncio.Queue()
        self._running = len(streams)
        self._tasks = [asyncio.create_task(self._pump(index, stream)) for index, stream in enumerate(streams)]
        for task in self._tasks:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _pump(self, index: int, stream: GenerateStream) -> None:
        try:
            async for response in stream:
                self._queue.put_nowait((index, response))
            self._queue.put_nowait((index, None))
        except Exception as error:  # noqa: BLE001 - handed to the reader
            self._queue.put_nowait((index, error))

    async def next(self) -> tuple[int, Response] | None:
        """The next response of any stream, with the stream's index; None once every stream has ended."""
        while self._running:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is not None:
                return index, item
            self._running -= 1
        return None

    def abandon(self) -> None:
        """Cancel the streams still running (the client went away, or another choice failed)."""
        loop = asyncio.get_running_loop()
        for stream, task in zip(self._streams, self._tasks):
            if task.done():
                continue
            stream.cancel()
            timer = loop.call_later(ABANDONED_GRACE_S, stream.call.cancel)
            task.add_done_callback(lambda _, timer=timer: timer.cancel())


@dataclass
class _Choice:
    """What one generation of a request has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    completion: pb.Completion = field(default_factory=pb.Completion)


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
        # n choices are n generations, `<request id>-<i>` at the router.
        ids = [request_id] if job.n == 1 else [f"{request_id}-{i}" for i in range(job.n)]
        streams = [GenerateStream(self.client.stub, rid, job.choice_params(i)) for i, rid in enumerate(ids)]
        relays = _Relays(streams, self.relays)
        self.metrics.in_flight += 1
        try:
            try:
                first = await relays.next()
            except grpc.aio.AioRpcError as error:
                status, error_json = _rpc_error_body(error)
                return _json_response(status, error_json, headers)
            responses = self._counted(relays, first, started)
            if job.stream:
                return await self._stream(request, job, request_id, responses, headers)
            return await self._whole(job, request_id, responses, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            log.info("request %s: client went away; cancelling it", request_id)
            raise
        finally:
            relays.abandon()
            self.metrics.in_flight -= 1

    async def _counted(self, relays: _Relays, first: tuple[int, Response] | None, started: float
                       ) -> AsyncIterator[tuple[int, Response]]:
        """The responses with their choice index, recording time to first token and tokens generated."""
        item, seen_tokens = first, False
        while item is not None:
            response = item[1]
            if response.HasField("tokens") and response.tokens.token_ids:
                if not seen_tokens:
                    self.metrics.observe_ttft(time.monotonic() - started)
                    seen_tokens = True
                self.metrics.generated_tokens += len(response.tokens.token_ids)
            yield item
            item = await relays.next()

    async def _whole(self, job: Job, request_id: str,
                     responses: AsyncIterator[tuple[int, Response]], headers: dict[str, str]
                     ) -> web.Response:
        choices = [_Choice(text=job.echo) for _ in range(job.n)]
        try:
            async for index, response in responses:
                made = choices[index]
                if response.HasField("tokens"):
                    made.text += response.tokens.text
                    made.token_ids += response.tokens.token_ids
                    made.logprobs += response.tokens.logprobs
                else:
                    made.completion = response.completion
        except grpc.aio.AioRpcError as error:
            status, error_json = _rpc_error_body(error)
            return _json_response(status, error_json, headers)
        shaped = [choice(job, index, text=made.text, token_ids=made.token_ids,
                         logprobs=logprobs_of(job, made.logprobs),
                         finish_reason=finish_reason_of(made.completion), streaming=False)
                  for index, made in enumerate(choices)]
        usage = usage_of([made.completion for made in choices])
        body = envelope(job, request_id, shaped, streaming=False, usage=usage)
        return _json_response(200, body, headers)

    async def _stream(self, request: web.Request, job: Job, request_id: str,
                      responses: AsyncIterator[tuple[int, Response]], headers: dict[str, str]
                      ) -> web.StreamResponse:
        """Server-sent events: a chunk per token batch of each choice, a finish chunk per choice, optionally
        usage, then [DONE]."""
        http = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await http.prepare(request)

        async def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
            await http.write(_sse(envelope(job, request_id, choices, streaming=True, usage=usage)))

        for index in range(job.n):
            if job.chat:
                await send([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
            elif job.echo:
                await send([choice(job, index, text=job.echo, token_ids=None, logprobs=None,
                                   finish_reason=None, streaming=True)])
        try:
            completions = [pb.Completion() for _ in range(job.n)]
            text_offsets = [0] * job.n  # for the legacy completions logprobs
            async for index, response in responses:
                if response.HasField("tokens"):
                    tokens = response.tokens
                    logprobs = logprobs_of(job, tokens.logprobs, text_offsets[index])
                    text_offsets[index] += sum(len(entry.token) for entry in tokens.logprobs)
                    await send([choice(job, index, text=tokens.text, token_ids=list(tokens.token_ids),
                                       logprobs=logprobs, finish_reason=None, streaming=True)])
                else:
                    completions[index] = response.completion
                    await send([choice(job, index, text=None, token_ids=[], logprobs=None, streaming=True,
                                       finish_reason=finish_reason_of(response.completion))])
            if job.include_usage:
                await send([], usage=usage_of(completions))
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
