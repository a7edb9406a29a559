"""OpenAI-compatible HTTP frontend: /v1/completions and /v1/chat/completions over the router.

Every HTTP request becomes one generation per choice (`n`), run by the router in this process or by a
remote RouterService (`backends.py`). A client that disconnects cancels its request end to end (the router
stops decode and frees KV on both workers), so an abandoned request costs nothing. Each message from the
router becomes one write to the client, its SSE events serialized with orjson around an envelope
serialized once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from dynamo_grpc import metrics, tracing
from dynamo_grpc.errors import DynamoError
from dynamo_grpc.frontend.backends import Backend, Generation
from dynamo_grpc.frontend.openai_protocol import (
    MAX_N,
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
from dynamo_grpc.params import MAX_REQUEST_ID_CHARS, valid_request_id
from dynamo_grpc.registry import SCALE_DOCUMENT, Registry
from dynamo_grpc.routing.fleet import Fleet
from dynamo_grpc.routing.policies import RoundRobin
from dynamo_grpc.routing.router import PickedPair
from dynamo_grpc.security import Tls, bearer_matches, is_loopback
from dynamo_grpc.services.streams import Mailbox
from dynamo_grpc.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"; only ever seen in /metrics
ABANDONED_GRACE_S = 30.0  # how long a cancelled request may take to wind down before its call is cut
MAX_BODY_BYTES = 4 * 2**20  # a 128k-token prompt is under 1 MiB of JSON, even as token ids
MAX_JSON_DEPTH = 64  # OpenAI requests nest a few levels
IDLE_TIMEOUT_S = 60.0
"""A connection with no request under way for this long is closed (keep-alive)."""
HEADER_TIMEOUT_S = 10.0
"""A request's headers must arrive within this long of their first byte."""
BODY_TIMEOUT_S = 10.0
"""A request's body must arrive within this long of its headers (else 408)."""
# Room for the `-<i>` of a choice's id within what the router takes.
MAX_HTTP_REQUEST_ID_CHARS = MAX_REQUEST_ID_CHARS - len(f"-{MAX_N - 1}")


class _Relays:
    """Reads the generations of one HTTP request (one per choice), each in its own task, into one mailbox.

    A disconnect cancels the HTTP handler wherever it waits; were that inside a generation, the cancel would
    land in the router's path instead of going in-band. Here the handler only waits on the mailbox, and
    an abandoned generation keeps being read until the router confirms the cancel.
    """

    def __init__(self, generations: list[Generation], tasks: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        self._generations = generations
        self._mailbox: Mailbox[tuple[int, Any]] = Mailbox(loop)
        self._running = len(generations)
        self._completed = 0
        self._tasks = [loop.create_task(self._pump(index, g)) for index, g in enumerate(generations)]
        for task in self._tasks:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _pump(self, index: int, generation: Generation) -> None:
        ending: DynamoError | None = None
        try:
            async for response in generation.responses:
                self._mailbox.put((index, response))
        except DynamoError as error:
            log.info("request %s failed: %s %s", generation.request_id, error.code.name, error.message)
            ending = error
        except Exception:  # a bug must still end the request with a status, as over gRPC
            log.exception("request %s: generation failed unexpectedly", generation.request_id)
            ending = DynamoError("internal error; see the server log", request_id=generation.request_id)
        self._mailbox.put((index, ending))

    async def next(self) -> tuple[int, Any] | None:
        """The next response (tokens, or a completion) of any generation, with the choice's index; None once
        every generation has ended. Raises a generation's error."""
        while self._running:
            index, item = await self._mailbox.get()
            if isinstance(item, DynamoError):
                raise item
            if item is not None:
                if not item.HasField("tokens"):
                    self._completed += 1
                return index, item
            self._running -= 1
        return None

    def abandon(self) -> None:
        """Cancel the generations still running (the client went away, or another choice failed)."""
        if self._completed == len(self._generations):
            return
        loop = asyncio.get_running_loop()
        for generation, task in zip(self._generations, self._tasks):
            if task.done():
                continue
            generation.cancel()
            timer = loop.call_later(ABANDONED_GRACE_S, task.cancel)
            task.add_done_callback(lambda _, timer=timer: timer.cancel())


def _parts(response: Any) -> tuple[pb.TokenBatch | None, pb.Completion | None]:
    """A response's new tokens and its completion; a completion may carry the last tokens."""
    if response.HasField("tokens"):
        return response.tokens, None
    completion = response.completion
    return (completion.last_tokens if completion.HasField("last_tokens") else None), completion


@dataclass
class _Choice:
    """What one generation of a request has produced so far."""

    text: list[str]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    completion: pb.Completion = field(default_factory=pb.Completion)


def _decoded(raw: bytes, encoding: str) -> bytes:
    """The body without its Content-Encoding, at most MAX_BODY_BYTES (aiohttp's own decoding is off: a
    truncated deflate body hangs its connection)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or no encoding")
    # gzip, or deflate in its zlib wrapping (what HTTP means) or raw (what some clients send).
    zlib_wrapped = raw[:1] == b"\x78"
    wbits = zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS
    decompressor = zlib.decompressobj(wbits)
    try:
        body = decompressor.decompress(raw, MAX_BODY_BYTES + 1)
    except zlib.error as error:
        raise BadRequest(f"the request body is not valid {encoding} data ({error}), which its Content-Encoding "
                         "header says it is; send it so encoded, or uncompressed without the header") from None
    if len(body) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(body))
    if not decompressor.eof:
        raise BadRequest(f"the request body ends before its {encoding} data does; send all of it")
    return body


def _loads(raw: bytes) -> Any:
    """The body as JSON; raises BadRequest saying what is wrong with it."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _loads_as_python_does(raw)
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:  # else it cannot be nested so deep: nothing to walk
        _refuse_deep_nesting(body)
    return body


def _loads_as_python_does(raw: bytes) -> Any:
    # What orjson refuses and Python's reader may take: NaN, integers over 64 bits, lone surrogates (refused
    # below), or refuse in words a client can act on.
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the request body is JSON nested more than {MAX_JSON_DEPTH} deep; nest less") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    except ValueError:  # Python's limit on integer digits
        raise BadRequest(f"a number in the request body has more than {sys.get_int_max_str_digits()} digits"
                         ) from None
    _refuse_surrogates(body)
    return body


def _refuse_deep_nesting(body: Any) -> None:
    """Refuse JSON nested past MAX_JSON_DEPTH: no OpenAI request needs it, and deep values break whatever
    recurses over them later (comparisons, error messages)."""
    pending = [(body, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"the request body is JSON nested more than {MAX_JSON_DEPTH} deep; nest less")
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _refuse_surrogates(body: Any) -> None:
    """Refuse strings with a lone surrogate (JSON allows `\\ud800`; UTF-8, and so protobuf, cannot hold it)."""
    pending = [body]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError as error:
                    raise BadRequest(f"a string in the request body holds a lone surrogate "
                                     f"({item[error.start]!a}); send whole UTF-16 pairs") from None
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


OPEN_PATHS = frozenset(("/health", "/metrics"))
"""What answers without the bearer token: probes and scrapers hold no secret."""


def _requiring_token(token: bytes) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware that answers 401 (OpenAI's shape, `WWW-Authenticate: Bearer`) to a request without
    `Authorization: Bearer <token>`, except on OPEN_PATHS."""

    @web.middleware
    async def require_token(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
        if request.path in OPEN_PATHS or bearer_matches(request.headers.get("Authorization"), token):
            return await handler(request)
        given = "Authorization" in request.headers
        message = ("the API key is not valid for this server" if given else
                   "this server requires an API key: send `Authorization: Bearer <key>`")
        return _error(401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    return require_token


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", charset="utf-8",
                        headers=headers)


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None,
           param: str | None = None) -> web.Response:
    return _json_response(status, error_body(status, message, code, param), headers)


def _failure_body(failure: DynamoError) -> tuple[int, dict[str, Any]]:
    status = http_status(failure.code, failure.reason)
    return status, error_body(status, failure.message, failure.reason.lower())


class _EventStream(web.StreamResponse):
    """Server-sent events whose headers leave with the first event, in one write (as web.Response's do)."""

    _send_headers_immediately = False


class _Events:
    """A request's SSE events as bytes: its envelope is serialized once, each event only adds its choice."""

    def __init__(self, job: Job, request_id: str) -> None:
        head = envelope(job, request_id, [], streaming=True)
        del head["choices"]
        head.pop("usage", None)
        self._prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":['
        self._suffix = b'],"usage":null}\n\n' if job.include_usage else b"]}\n\n"

    def choice(self, shaped: dict[str, Any]) -> bytes:
        return self._prefix + orjson.dumps(shaped) + self._suffix

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Frontend:
    """The HTTP handlers; every generation runs through `backend`."""

    def __init__(self, backend: Backend, registry: Registry, fleet: Fleet, chat_template: str | None = None,
                 token: str | None = None) -> None:
        self.backend = backend
        self.registry = registry
        self.fleet = fleet
        """The workers as this process last saw them: /health and /v1/models answer from it at once."""
        self.scaled_to_zero = False
        """The deployment autoscales (its scale document exists), as last seen (`follow_scale`)."""
        self.chat_template = chat_template
        self.metrics = metrics.frontend()
        self.relays: set[asyncio.Task[None]] = set()
        self.body_timeout_s = BODY_TIMEOUT_S
        middlewares = [self._count_and_shape_errors]
        if token is not None:  # no per-request check without a token
            middlewares.append(_requiring_token(token.encode()))
        self.app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", metrics.metrics_handler),
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
            self.metrics.requests.labels(endpoint, str(status)).inc()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        """A generation request, in a span continuing the client's trace when tracing is on."""
        with tracing.http_span(request.method, request.path, request.headers):
            return await self._answer(request, chat=chat)

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if not valid_request_id(request_id, MAX_HTTP_REQUEST_ID_CHARS):  # not echoed: it may not be writable
            return _error(400, f"the {REQUEST_ID_HEADER} header must be 1 to {MAX_HTTP_REQUEST_ID_CHARS} "
                          "printable ASCII characters; send a shorter id, or none to get one",
                          "invalid_request_id", param=REQUEST_ID_HEADER)
        headers = {REQUEST_ID_HEADER: request_id}
        if (request.content_length or 0) > MAX_BODY_BYTES:  # refused before a byte of it is read
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            refusal = _error(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                             "request_timeout", headers)
            refusal.force_close()
            return refusal
        try:
            raw = _decoded(raw, request.headers.get("Content-Encoding", ""))
        except BadRequest as error:
            return _error(400, error.message, "invalid_body", headers)
        try:
            body = _loads(raw)
        except BadRequest as error:
            return _error(400, error.message, "invalid_json", headers)
        try:
            job = parse_job(body, chat=chat, chat_template=self.chat_template)
        except BadRequest as error:
            return _error(400, error.message, "invalid_request", headers, error.param)

        started = time.monotonic()
        # n choices are n generations, `<request id>-<i>` at the router.
        ids = [request_id] if job.n == 1 else [f"{request_id}-{i}" for i in range(job.n)]
        picked = PickedPair.from_headers(request.headers)
        generations = [self.backend.open(rid, job.choice_params(i), picked) for i, rid in enumerate(ids)]
        relays = _Relays(generations, self.relays)
        self.metrics.inflight.inc()
        try:
            try:
                first = await relays.next()
            except DynamoError as error:
                status, error_json = _failure_body(error)
                return _json_response(status, error_json, headers)
            if job.stream:
                return await self._stream(request, job, request_id, relays, first, started, headers)
            return await self._whole(job, request_id, relays, first, started, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            log.info("request %s: client went away; cancelling it", request_id)
            raise
        finally:
            relays.abandon()
            self.metrics.inflight.dec()

    def _first_token(self, tokens: pb.TokenBatch | None, first_at: float | None, job: Job, started: float
                     ) -> float | None:
        """When the request's first token came: now, if `tokens` are its first (then its TTFT is observed)."""
        if first_at is not None or tokens is None or not tokens.token_ids:
            return first_at
        now = time.monotonic()
        self.metrics.of_model(job.model).ttft.observe(now - started)
        return now

    def _finished(self, job: Job, started: float, first_at: float | None, completions: list[pb.Completion]
                  ) -> None:
        """Observe a request whose every choice completed: once, with its totals."""
        now, series = time.monotonic(), self.metrics.of_model(job.model)
        generated = sum(c.usage.completion_tokens for c in completions)
        series.duration.observe(now - started)
        series.input_tokens.observe(completions[0].usage.prompt_tokens)
        series.output_tokens.observe(generated)
        per_choice = generated / job.n
        if first_at is not None and per_choice > 1:
            series.itl.observe((now - first_at) / (per_choice - 1))

    async def _whole(self, job: Job, request_id: str, relays: _Relays, item: tuple[int, Any] | None,
                     started: float, headers: dict[str, str]) -> web.Response:
        choices = [_Choice(text=[job.echo]) for _ in range(job.n)]
        first_at, finished = None, 0
        try:
            while item is not None:
                made = choices[item[0]]
                tokens, completion = _parts(item[1])
                first_at = self._first_token(tokens, first_at, job, started)
                if tokens is not None:
                    made.text.append(tokens.text)
                    made.token_ids += tokens.token_ids
                    made.logprobs += tokens.logprobs
                if completion is not None:
                    made.completion = completion
                    finished += 1
                    if finished == job.n:
                        break
                item = await relays.next()
        except DynamoError as error:
            status, error_json = _failure_body(error)
            return _json_response(status, error_json, headers)
        self._finished(job, started, first_at, [made.completion for made in choices])
        shaped = [choice(job, index, text="".join(made.text), token_ids=made.token_ids,
                         logprobs=logprobs_of(job, made.logprobs),
                         finish_reason=finish_reason_of(made.completion), streaming=False)
                  for index, made in enumerate(choices)]
        usage = usage_of([made.completion for made in choices])
        body = envelope(job, request_id, shaped, streaming=False, usage=usage)
        return _json_response(200, body, headers)

    async def _stream(self, request: web.Request, job: Job, request_id: str, relays: _Relays,
                      item: tuple[int, Any] | None, started: float, headers: dict[str, str]
                      ) -> web.StreamResponse:
        """Server-sent events: a chunk per token batch of each choice, a finish chunk per choice, optionally
        usage, then [DONE]. Each response from the router is one write, and the last carries the end."""
        http = _EventStream(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await http.prepare(request)
        sse = _Events(job, request_id)
        events: list[bytes] = []
        for index in range(job.n):
            if job.chat:
                events.append(sse.choice({"index": index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}))
            elif job.echo:
                events.append(sse.choice(choice(job, index, text=job.echo, token_ids=None, logprobs=None,
                                                finish_reason=None, streaming=True)))
        completions = [pb.Completion() for _ in range(job.n)]
        text_offsets = [0] * job.n  # for the legacy completions logprobs
        first_at, finished = None, 0
        try:
            while item is not None:
                index, response = item
                tokens, completion = _parts(response)
                if tokens is not None:
                    first_at = self._first_token(tokens, first_at, job, started)
                    logprobs = logprobs_of(job, tokens.logprobs, text_offsets[index])
                    if logprobs is not None:
                        text_offsets[index] += sum(len(entry.token) for entry in tokens.logprobs)
                    token_ids = list(tokens.token_ids) if job.return_token_ids else None
                    events.append(sse.choice(choice(job, index, text=tokens.text, token_ids=token_ids,
                                                    logprobs=logprobs, finish_reason=None, streaming=True)))
                if completion is not None:
                    completions[index] = completion
                    finished += 1
                    events.append(sse.choice(choice(job, index, text=None, token_ids=[], logprobs=None,
                                                    streaming=True, finish_reason=finish_reason_of(completion))))
                    if finished == job.n:
                        self._finished(job, started, first_at, completions)
                        break
                await http.write(b"".join(events))
                events.clear()
                item = await relays.next()
            if job.include_usage:
                events.append(sse.usage(usage_of(completions)))
        except DynamoError as error:  # too late for an HTTP status: the error goes in the stream
            events.append(_event(_failure_body(error)[1]))
        events.append(DONE)
        await http.write_eof(b"".join(events))
        return http

    async def models(self, request: web.Request) -> web.Response:
        created: dict[str, int] = {}
        for worker in self.fleet.workers.values():
            if worker.role == pb.WORKER_ROLE_DECODE:
                started = worker.started_at.seconds
                created[worker.model] = min(created.get(worker.model, started), started)
        return _json_response(200, {"object": "list", "data": [
            {"id": model, "object": "model", "created": at, "owned_by": "dynamo-grpc"}
            for model, at in sorted(created.items())]})

    async def health(self, request: web.Request) -> web.Response:
        """Ready while a decode worker is in this process's view of the fleet: without one every generation
        request fails, unless the deployment autoscales (then the next request starts one, and a balancer
        must keep sending). Answered from that view at once, also while etcd is out of reach (the view is
        then as etcd last showed it, and generation goes on over it): `registry_connected` and
        `view_age_s` (0 while the view is live) say how current it is."""
        lost_at = self.registry.watch_lost_at
        age_s = 0.0 if lost_at is None else round(time.monotonic() - lost_at, 3)
        state = {"registry_connected": lost_at is None, "view_age_s": age_s, "pid": os.getpid()}
        decode_workers = sum(w.role == pb.WORKER_ROLE_DECODE for w in self.fleet.workers.values())
        if decode_workers:
            return _json_response(200, {"status": "healthy", "decode_workers": decode_workers, **state})
        if self.scaled_to_zero:
            return _json_response(200, {"status": "scaled_to_zero", "decode_workers": 0, **state,
                                        "reason": "the next request starts a decode worker (cold start)"})
        return _json_response(503, {"status": "unhealthy", "decode_workers": 0, **state,
                                    "reason": "no decode worker is registered"})

    async def follow_scale(self) -> None:
        """Keep `scaled_to_zero` current (the registry retries a broken watch itself)."""
        async for data in self.registry.watch_document(SCALE_DOCUMENT):
            self.scaled_to_zero = data is not None


@dataclass
class RunningFrontend:
    """A serving frontend; `stop()` closes connections, cancelling what they ran (its backend stays open)."""

    frontend: Frontend
    runner: web.AppRunner
    host: str
    port: int
    following: asyncio.Task[None]
    """The scale document's watch."""
    own_fleet: Fleet | None = None
    """The view of the fleet it follows itself, when its backend routes elsewhere."""
    scheme: str = "http"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.frontend.relays:  # cancelled requests winding down at the router
            await asyncio.wait(set(self.frontend.relays), timeout=5.0)
        for task in [*self.frontend.relays, self.following]:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self.own_fleet is not None:
            await self.own_fleet.stop()


class _Connection(RequestHandler):
    """aiohttp's connection, which also closes when a request's headers are still unfinished
    `header_timeout_s` after their first byte (aiohttp itself bounds only the wait for a first byte, by its
    keep-alive timeout)."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is None and self._waiting_for_headers():
            self._header_timer = self._loop.call_later(self._header_timeout_s, self._headers_late,
                                                       self._request_count)

    def _waiting_for_headers(self) -> bool:
        """Bytes came, yet no request is complete or being handled: its headers are unfinished."""
        return not (self._request_in_progress or self._messages or self._force_close)

    def _headers_late(self, requests_before: int) -> None:
        self._header_timer = None
        if self._request_count == requests_before and self._waiting_for_headers():
            log.info("closing a connection whose request headers took over %g s", self._header_timeout_s)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


class _Server(web.Server):
    """Makes `_Connection`s."""

    header_timeout_s = HEADER_TIMEOUT_S

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs)


async def start_frontend(backend: Backend, registry: Registry, *, host: str, port: int,
                         chat_template: str | None = None, reuse_port: bool = False,
                         idle_timeout_s: float = IDLE_TIMEOUT_S, header_timeout_s: float = HEADER_TIMEOUT_S,
                         body_timeout_s: float = BODY_TIMEOUT_S, tls: Tls | None = None,
                         token: str | None = None) -> RunningFrontend:
    """Serve the OpenAI API on host:port (0 picks a free port), generating through `backend`; with
    `reuse_port`, beside other processes listening on the same port (SO_REUSEPORT). A connection idle between
    requests for `idle_timeout_s`, or whose request headers take over `header_timeout_s`, is closed; a body
    slower than `body_timeout_s` gets 408. A running response is never cut by them. `tls`: HTTPS with its
    certificate; `token`: the bearer token (API key) every request but /health and /metrics needs."""
    fleet, own_fleet = backend.fleet, None
    if fleet is None:  # routing happens elsewhere: follow the workers for /health and /v1/models
        fleet = own_fleet = Fleet(registry, routing=RoundRobin.name, load_poll_s=0)
        await own_fleet.start()
    frontend = Frontend(backend, registry, fleet, chat_template, token)
    frontend.body_timeout_s = body_timeout_s
    following = asyncio.create_task(frontend.follow_scale())
    # handler_cancellation: a disconnect cancels the handler at once, not at its next write. Our own
    # decompression (`_decoded`); a response to a body left unread (a 408) leaves within a second.
    runner = web.AppRunner(frontend.app, handler_cancellation=True, access_log=None, auto_decompress=False,
                           keepalive_timeout=idle_timeout_s, lingering_time=1.0)
    try:
        await runner.setup()
        runner.server.__class__ = _Server  # the same server, making our connections (aiohttp has no hook)
        runner.server.header_timeout_s = header_timeout_s
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None,
                           ssl_context=None if tls is None else tls.http_context())
        await site.start()
    except BaseException:
        await runner.cleanup()
        following.cancel()
        if own_fleet is not None:
            await own_fleet.stop()
        raise
    bound = runner.addresses[0][1]
    scheme = "http" if tls is None else "https"
    log.info("OpenAI frontend serving on %s://%s:%d (%s)", scheme, host, bound, backend.description)
    if tls is None and not is_loopback(host):
        log.warning("HTTP on %s:%d is plaintext; give --tls-cert and --tls-key for HTTPS", host, bound)
    return RunningFrontend(frontend, runner, host, bound, following, own_fleet, scheme)
