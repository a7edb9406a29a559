"""The router's request path: pick a pair, prefill there, decode with the KV handle, relay tokens.

One implementation for every entry point: RouterService serves it over gRPC, and the HTTP frontend runs it
in its own process (`open_router`), one hop fewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from dynamo_grpc import metrics, tracing
from dynamo_grpc.channels import MAX_MESSAGE_BYTES, ChannelPool
from dynamo_grpc.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DynamoError,
    Unavailable,
    from_rpc_error,
    message_too_large,
)
from dynamo_grpc.params import (
    check_request_id_form,
    deadline_timer,
    estimated_tokens,
    prompt_of,
    sampling_of,
    seconds_left,
)
from dynamo_grpc.registry import Registry
from dynamo_grpc.routing.fleet import (
    ALWAYS_DISAGGREGATE,
    DEFAULT_LOAD_POLL_S,
    DisaggregationPolicy,
    Fleet,
    Route,
)
from dynamo_grpc.routing.policies import DEFAULT_POLICY
from dynamo_grpc.routing.prompt_tokens import PromptTokenizer
from dynamo_grpc.security import Tls
from dynamo_grpc.services.streams import CancelSignal, send_quietly
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc

log = logging.getLogger(__name__)


DEFAULT_MAX_MIGRATIONS = 2


@dataclass(frozen=True)
class PickedPair:
    """Workers chosen for a request before it arrived, by an endpoint picker in front of the frontend
    (`services/endpoint_picker.py`), which names them in two request headers."""

    decode_worker_id: str
    prefill_worker_id: str = ""
    """Empty: the decode worker prefills."""

    DECODE_HEADER: ClassVar[str] = "x-dynamo-decode-worker"
    PREFILL_HEADER: ClassVar[str] = "x-dynamo-prefill-worker"

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> PickedPair | None:
        decode = headers.get(cls.DECODE_HEADER)
        return cls(decode, headers.get(cls.PREFILL_HEADER, "")) if decode else None


class Router:
    """Runs requests over a fleet: each `generate` picks a pair, prefills, decodes and relays the tokens."""

    def __init__(self, fleet: Fleet, channels: ChannelPool, *, max_migrations: int = DEFAULT_MAX_MIGRATIONS,
                 tokenizer: PromptTokenizer | None = None, cold_start_wait_s: float = 0.0) -> None:
        self.fleet = fleet
        self._channels = channels
        self._max_migrations = max_migrations
        self._cold_start_wait_s = cold_start_wait_s
        self._tokenizer = tokenizer or PromptTokenizer()
        self._live: set[str] = set()
        # Per endpoint, the method over its channel (and that channel: a reset one makes a new method).
        self._prefill_calls: dict[str, tuple[grpc.aio.Channel, grpc.aio.UnaryUnaryMultiCallable]] = {}
        self._decode_calls: dict[str, tuple[grpc.aio.Channel, grpc.aio.StreamStreamMultiCallable]] = {}
        self._cancels: set[asyncio.Task[None]] = set()
        """Cancel messages on their way to decode workers (held here so none is collected mid-send)."""
        self._metrics = metrics.router()
        self._stop_sampling = metrics.sample(self, fleet.metric_samples)

    async def close(self) -> None:
        """Stop following the fleet and close the channels to its workers."""
        await self._stop_sampling()
        await self.fleet.stop()
        await self._channels.close()

    def pick(self, request_id: str, params: pb.GenerationParams, *, exclude: Collection[str] = ()) -> Route:
        """The pair this router would run the request on now (`exclude`: decode workers not to pick)."""
        prompt = None
        if self.fleet.routing.uses_prefix_cache:
            prompt = self._tokenizer.token_ids(params, self.fleet.engine_of(params.model))
        return self.fleet.route(params.model, request_id, prompt_tokens=estimated_tokens(params),
                                prompt=prompt, exclude=exclude)

    async def generate(self, request_id: str, params: pb.GenerationParams, cancelled: CancelSignal,
                       picked: PickedPair | None = None) -> AsyncIterator[decode_pb.DecodeResponse]:
        """Run one request end to end; setting `cancelled` stops it and frees its KV everywhere. `picked`
        runs it on a pair chosen already (by an endpoint picker in front), while both workers are live.

        Yields the decode worker's messages as they come (token batches, then a completion, which may carry
        the last tokens in `last_tokens`), relayed without being rebuilt.
        """
        with self._metrics.request() as timer, tracing.span("route", **{"request.id": request_id}):
            check_request_id_form(request_id)
            prompt_of(params, request_id)
            sampling_of(params, request_id)
            timeout = seconds_left(params, request_id)
            _check_message_size(request_id, params)
            if request_id in self._live:
                raise AlreadyExists(f"request id {request_id!r} is already running; use a fresh id",
                                    request_id=request_id)
            self._live.add(request_id)
            first_at = response = None
            # The deadline cancels the request like a client would, then turns its end into DEADLINE_EXCEEDED.
            try:
                with deadline_timer(timeout, cancelled.set) as expired:
                    running = self._run(request_id, params, cancelled, timeout, picked)
                    async with contextlib.aclosing(running) as responses:
                        async for response in responses:
                            if expired.is_set() and response.HasField("completion"):
                                break
                            if first_at is None:
                                first_at = time.perf_counter()
                            yield response
                    if expired.is_set():
                        raise DeadlineExceeded("the request's deadline passed before it finished",
                                               request_id=request_id)
            finally:
                self._live.discard(request_id)
            if response is not None and response.HasField("completion"):
                timer.outcome = self._observe_finished(response.completion, timer.started, first_at)

    def _observe_finished(self, completion: pb.Completion, started: float, first_at: float | None) -> str:
        """Observe a finished request's latencies once; its outcome label (the finish reason)."""
        generated = completion.usage.completion_tokens
        if first_at is not None and generated:
            self._metrics.ttft.observe(first_at - started)
            if generated > 1:
                self._metrics.itl.observe((time.perf_counter() - first_at) / (generated - 1))
        return metrics.finish_label(completion.finish_reason)

    async def _run(self, request_id: str, params: pb.GenerationParams, cancelled: CancelSignal,
                   timeout: float | None, picked: PickedPair | None
                   ) -> AsyncIterator[decode_pb.DecodeResponse]:
        route = self._picked_route(request_id, params, picked) if picked is not None else None
        if route is None:
            route = await self._route(params, request_id, timeout, cancelled)
        if route is None:
            yield decode_pb.DecodeResponse(request_id=request_id, completion=pb.Completion(
                finish_reason=pb.FINISH_REASON_CANCELLED))
            return
        handle = prefilled = None
        # 1) Prefill on the paired worker (its KV is then held there under a lease).
        if route.prefill is not None:
            prefilled = await self._prefill(route.prefill, request_id, params, timeout, route.uncached_tokens)
            handle = prefilled.kv_handle if prefilled is not None else None
            if cancelled.is_set():
                if handle is not None:
                    await self._release(handle, request_id)
                yield decode_pb.DecodeResponse(request_id=request_id, completion=pb.Completion(
                    finish_reason=pb.FINISH_REASON_CANCELLED, prefill_worker_id=route.prefill.worker_id))
                return
        self._metrics.prefills.labels("remote" if handle is not None else "local" if route.prefill is None
                                      else "fallback").inc()
        # 2) Decode, pulling that KV; relay its stream; forward a cancel. If the decode worker dies, another
        #    one resumes after the tokens already relayed (migration), so the client sees one stream.
        start = decode_pb.DecodeStart(params=params, kv_handle=handle, last_tokens_in_completion=True,
                                      kv_transports=route.kv_transports,
                                      prefill_worker_id=route.prefill.worker_id if handle else "")
        decode, generated, failed = route.decode, [], []
        to_compute = route.uncached_tokens if handle is None else 0
        consumed = False
        try:
            while True:
                try:
                    async with contextlib.aclosing(self._decode(decode, request_id, start, cancelled,
                                                                to_compute)) as events:
                        async for event in events:
                            if event.HasField("tokens"):
                                generated += event.tokens.token_ids
                            else:
                                completion = event.completion
                                consumed = completion.kv_transfer.bytes > 0
                                if prefilled is not None and completion.usage.kv_transferred_tokens:
                                    # The prompt was computed on the prefill worker: its cache hits count.
                                    completion.usage.cached_tokens = prefilled.usage.cached_tokens
                            yield event
                    return
                except DynamoError as error:
                    if handle is not None and not generated and error.reason == "KV_HANDLE_EXPIRED":
                        # The lease ended before the decode worker could take the KV (its link was down,
                        # say): the request is still good, so the decode worker prefills it itself.
                        log.warning("request %s: its KV expired on prefill worker %s before decode worker %s "
                                    "took it; the decode worker prefills the prompt", request_id,
                                    route.prefill.worker_id if route.prefill else "?", decode.worker_id)
                        handle, to_compute = None, route.uncached_tokens
                        start = decode_pb.DecodeStart(params=params, last_tokens_in_completion=True)
                        continue
                    if not self._worker_lost(error, cancelled) or len(failed) >= self._max_migrations or \
                            len(generated) >= sampling_of(params, request_id).max_tokens:
                        raise
                    failed.append(decode.worker_id)
                    self.fleet.mark_down(decode.worker_id)
                    try:
                        decode = self.fleet.route(params.model, request_id, exclude=failed).decode
                    except DynamoError:
                        raise error from None  # nowhere to resume: report the loss itself
                    log.warning("request %s: decode worker %s lost after %d tokens (%s); resuming on %s",
                                request_id, failed[-1], len(generated), error.message, decode.worker_id)
                    self._metrics.migrations.inc()
                    start = decode_pb.DecodeStart(params=params, last_tokens_in_completion=True,
                                                  resume_token_ids=generated)
        finally:
            if handle is not None and not consumed:
                await asyncio.shield(self._release(handle, request_id))

    def _picked_route(self, request_id: str, params: pb.GenerationParams, picked: PickedPair) -> Route | None:
        """The pair an endpoint picker chose; None (route anew) when its decode worker is gone or serves
        another model. A prefill worker that is gone, or cannot pair with it, leaves the prefill to the
        decode worker."""
        decode = self.fleet.workers.get(picked.decode_worker_id)
        if decode is None or decode.role != pb.WORKER_ROLE_DECODE or decode.model != params.model:
            log.info("request %s: picked decode worker %s is not live for %s; routing anew", request_id,
                     picked.decode_worker_id, params.model)
            return None
        prefill = self.fleet.workers.get(picked.prefill_worker_id) if picked.prefill_worker_id else None
        if prefill is not None and (prefill.role != pb.WORKER_ROLE_PREFILL or prefill.model != decode.model
                                    or prefill.engine_fingerprint != decode.engine_fingerprint):
            prefill = None  # not a partner of this decode worker: it prefills itself
        return Route(decode=decode, prefill=prefill, uncached_tokens=estimated_tokens(params))

    async def _route(self, params: pb.GenerationParams, request_id: str, timeout: float | None,
                     cancelled: asyncio.Event) -> Route | None:
        """The request's pair; with no decode worker at all, wait up to `cold_start_wait_s` for one to
        start (an autoscaled fleet at zero). None when the request is cancelled meanwhile."""
        def route() -> Route:
            return self.pick(request_id, params)

        try:
            return route()
        except Unavailable as error:
            if error.reason != "NO_WORKERS" or self._cold_start_wait_s <= 0:
                raise
        wait = min(self._cold_start_wait_s, timeout) if timeout is not None else self._cold_start_wait_s
        log.info("request %s: no decode worker; waiting up to %.0f s for one to start", request_id, wait)
        if not await self.fleet.until_decode_worker(params.model, wait, cancelled):
            if cancelled.is_set():
                return None
            raise Unavailable(f"no decode worker started within {wait:g} s of the request (the fleet may be "
                              "scaled to zero and still starting one); retry, or raise --cold-start-wait-s",
                              request_id=request_id, reason="NO_WORKERS")
        return route()

    @staticmethod
    def _worker_lost(error: DynamoError, cancelled: asyncio.Event) -> bool:
        """The stream broke because the worker went away, not because of the request or its client."""
        return error.code == grpc.StatusCode.UNAVAILABLE or (
            error.code == grpc.StatusCode.CANCELLED and not cancelled.is_set())

    def _method(self, calls: dict[str, tuple[grpc.aio.Channel, Any]], endpoint: str,
                make: Callable[[grpc.aio.Channel], Any]) -> Any:
        """A stub method on `endpoint`'s channel, made at its first call and again once the channel is reset."""
        channel = self._channels.get(endpoint)
        cached = calls.get(endpoint)
        if cached is None or cached[0] is not channel:
            cached = calls[endpoint] = (channel, make(channel))
        return cached[1]

    async def _prefill(self, worker: pb.WorkerInfo, request_id: str, params: pb.GenerationParams,
                       timeout: float | None, tokens: int) -> prefill_pb.PrefillResponse | None:
        """The KV handle and usage, or None when the prefill worker is gone (then decode prefills)."""
        prefill = self._method(self._prefill_calls, worker.endpoint,
                               lambda channel: prefill_grpc.PrefillServiceStub(channel).Prefill)
        with self.fleet.busy(worker, tokens):
            try:
                response = await prefill(prefill_pb.PrefillRequest(request_id=request_id, params=params),
                                         timeout=timeout, metadata=tracing.metadata())
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    log.warning("request %s: prefill worker %s unavailable (%s); prefilling on decode",
                                request_id, worker.worker_id, error.details())
                    self.fleet.mark_down(worker.worker_id)
                    return None
                failure = from_rpc_error(error, request_id=request_id)
                if failure.reason == "KV_HELD_LIMIT":  # its unpulled KV is at its limit: not this request's fault
                    log.warning("request %s: prefill worker %s holds all the unpulled KV it may (%s); prefilling "
                                "on decode", request_id, worker.worker_id, failure.message)
                    return None
                raise failure from None
        return response

    async def _decode(self, worker: pb.WorkerInfo, request_id: str, start: decode_pb.DecodeStart,
                      cancelled: CancelSignal, to_compute: int) -> AsyncIterator[decode_pb.DecodeResponse]:
        """The decode worker's stream; a cancel goes to the worker in-band the moment `cancelled` is set,
        and closing this stream early cancels the call, so the worker aborts the request either way."""
        decode = self._method(self._decode_calls, worker.endpoint,
                              lambda channel: decode_grpc.DecodeServiceStub(channel).Decode)
        with self.fleet.busy(worker, to_compute):
            call = decode(metadata=tracing.metadata())

            def send_cancel() -> None:
                cancel = decode_pb.DecodeRequest(request_id=request_id,
                                                 cancel=pb.CancelAction(reason="client cancelled"))
                sending = asyncio.ensure_future(send_quietly(call, cancel))
                self._cancels.add(sending)
                sending.add_done_callback(self._cancels.discard)

            try:
                # The cancel may only follow the start: gRPC sends one message of a call at a time.
                await send_quietly(call, decode_pb.DecodeRequest(request_id=request_id, start=start))
                cancelled.add_callback(send_cancel)
                async for event in call:
                    yield event
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error, request_id=request_id) from None
            finally:
                cancelled.remove_callback(send_cancel)
                call.cancel()  # a no-op once the call has ended

    async def _release(self, handle: pb.KvHandle, request_id: str) -> None:
        stub = kv_grpc.KvTransferServiceStub(self._channels.get(handle.endpoint))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.ReleaseKv(kv_pb.ReleaseKvRequest(request_id=request_id, transfer_id=handle.transfer_id,
                                                        pull_token=handle.pull_token), metadata=tracing.metadata())


def _check_message_size(request_id: str, params: pb.GenerationParams) -> None:
    """Refuse a request whose message to a worker would be over gRPC's limit, before routing reads its prompt:
    the same refusal, at the same size, as a RouterService client gets from its own channel."""
    size = _field_size(len(request_id.encode())) + _field_size(_field_size(params.ByteSize()))
    if size > MAX_MESSAGE_BYTES:
        raise message_too_large(size, MAX_MESSAGE_BYTES, request_id=request_id)


def _field_size(payload: int) -> int:
    """Bytes of a length-delimited protobuf field with a one-byte tag."""
    return 1 + max(1, (payload.bit_length() + 6) // 7) + payload


async def open_router(registry: Registry, *, max_migrations: int = DEFAULT_MAX_MIGRATIONS,
                      policy: DisaggregationPolicy = ALWAYS_DISAGGREGATE, routing: str = DEFAULT_POLICY,
                      tokenizer: str = "", load_poll_s: float = DEFAULT_LOAD_POLL_S,
                      cold_start_wait_s: float = 0.0, tls: Tls | None = None) -> Router:
    """A router following the fleet in `registry`, ready to route, its channels to workers TLS with `tls`;
    `close()` stops it."""
    channels = ChannelPool(tls)
    fleet = Fleet(registry, policy, routing=routing, channels=channels, load_poll_s=load_poll_s)
    await fleet.start()
    return Router(fleet, channels, max_migrations=max_migrations, tokenizer=PromptTokenizer(tokenizer),
                  cold_start_wait_s=cold_start_wait_s)
