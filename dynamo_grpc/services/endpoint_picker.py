"""The router as an endpoint picker (EPP) for Envoy-based gateways: Envoy's External Processing API in the
Gateway API Inference Extension's protocol (docs/mesh.md).

Envoy streams each OpenAI request's headers and body here; the router reads the model and prompt, picks
the pair it would pick itself (`Router.pick`: prefix cache, load, pairing, conditional disaggregation) and
answers with
- `x-gateway-destination-endpoint: <ip:port>`, and the same in dynamic metadata `envoy.lb`: the OpenAI
  frontend beside the chosen decode worker (the worker's host, the pool's target port), where Envoy sends
  the request;
- `x-dynamo-decode-worker` and `x-dynamo-prefill-worker`: the pair, which that frontend runs as picked.
The picked workers count as busy for as long as Envoy keeps the stream open (the request's life, when
Envoy sends the response's headers or trailers here), so the next pick sees them loaded at once.

Body modes: BUFFERED (the body in one message; the answer rides on the body response) and
FULL_DUPLEX_STREAMED (the body in chunks; the answer to the headers waits for the whole body, which goes
back unchanged). A request without a body (GET /v1/models) goes to the decode workers in turn.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from envoy.type.v3 import http_status_pb2 as http_pb
from google.protobuf import struct_pb2

from dynamo_grpc.errors import DynamoError
from dynamo_grpc.frontend.openai_protocol import BadRequest, error_body, http_status, parse_job
from dynamo_grpc.routing.fleet import Route
from dynamo_grpc.routing.router import PickedPair, Router
from dynamo_grpc.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = ext_pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
_CHAT_PATHS = ("/v1/chat/completions",)
FULL_DUPLEX = mode_pb.ProcessingMode.FULL_DUPLEX_STREAMED


add_to_server = ext_grpc.add_ExternalProcessorServicer_to_server


class EndpointPicker(ext_grpc.ExternalProcessorServicer):
    """One ext_proc stream per request; `target_port` is the port of the OpenAI frontend beside each decode
    worker (the InferencePool's target port)."""

    def __init__(self, router: Router, *, target_port: int, chat_template: str | None = None) -> None:
        self._router = router
        self._target_port = target_port
        self._chat_template = chat_template
        self._turn = itertools.count()

    async def Process(self, request_iterator: AsyncIterator[ext_pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ext_pb.ProcessingResponse]:
        duplex = answered = False
        path, subset, body = "", None, bytearray()
        with contextlib.ExitStack() as busy:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if message.HasField("protocol_config"):
                    duplex = message.protocol_config.request_body_mode == FULL_DUPLEX
                if kind == "request_headers":
                    path = _header(message.request_headers.headers, ":path").partition("?")[0]
                    subset = _subset(message.metadata_context)
                    if message.request_headers.end_of_stream:  # no body: nothing to read a model from
                        yield self._answer_headers(self._pick_without_body(subset, busy))
                        answered = True
                    elif not duplex:
                        yield ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse())
                    continue
                if kind == "request_body":  # buffered: the whole body at once; full duplex: in chunks
                    body += message.request_body.body
                    if duplex and not message.request_body.end_of_stream:
                        continue
                elif answered or kind != "request_trailers":
                    yield _passed(message, duplex)
                    continue
                # The whole request is in (its body ended, or trailers came): pick, and answer.
                answered = True
                answer = self._pick(bytes(body), path, subset, busy)
                if isinstance(answer, ext_pb.ProcessingResponse):  # refused: Envoy answers the client
                    yield answer
                    return
                for response in self._answer_request(answer, bytes(body), duplex, kind == "request_trailers"):
                    yield response

    def _answer_request(self, picked: _Picked, body: bytes, duplex: bool, trailers: bool
                        ) -> list[ext_pb.ProcessingResponse]:
        """Full duplex: the routing answers the headers, then the body goes back unchanged (and the trailers
        through). Buffered: the routing rides on the body's response."""
        if not duplex:
            return [ext_pb.ProcessingResponse(request_body=ext_pb.BodyResponse(response=_routing(picked)),
                                              dynamic_metadata=_lb_metadata(picked))]
        answers = [self._answer_headers(picked), _body_passed(body, end_of_stream=not trailers)]
        if trailers:
            answers.append(ext_pb.ProcessingResponse(request_trailers=ext_pb.TrailersResponse()))
        return answers

    def _answer_headers(self, answer: _Picked | ext_pb.ProcessingResponse) -> ext_pb.ProcessingResponse:
        if isinstance(answer, ext_pb.ProcessingResponse):
            return answer
        return ext_pb.ProcessingResponse(request_headers=ext_pb.HeadersResponse(response=_routing(answer)),
                                         dynamic_metadata=_lb_metadata(answer))

    def _pick(self, body: bytes, path: str, subset: list[str] | None, busy: contextlib.ExitStack
              ) -> _Picked | ext_pb.ProcessingResponse:
        """The pair for an OpenAI request body, or the refusal Envoy sends the client instead."""
        request_id = uuid.uuid4().hex
        try:
            job = parse_job(json.loads(body), chat=path in _CHAT_PATHS, chat_template=self._chat_template)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _refusal(400, f"the request body is not valid JSON: {error}", "invalid_json")
        except BadRequest as error:
            return _refusal(400, error.message, "invalid_request", error.param)
        outside = self._outside(subset)
        if subset is not None and not self._decodes(subset):
            return _refusal(503, "no decode worker is in the gateway's endpoint subset", "no_workers")
        try:
            route = self._router.pick(request_id, job.params, exclude=outside)
        except DynamoError as error:
            return _refusal(http_status(error.code, error.reason), error.message, error.reason.lower())
        busy.enter_context(self._busy(route))
        picked = _Picked(self._endpoint(route.decode), route)
        log.info("request %s for %s: decode worker %s, prefill worker %s, endpoint %s", request_id, job.model,
                 route.decode.worker_id, route.prefill.worker_id if route.prefill else "-", picked.endpoint)
        return picked

    def _pick_without_body(self, subset: list[str] | None, busy: contextlib.ExitStack
                           ) -> _Picked | ext_pb.ProcessingResponse:
        decodes = self._decodes(subset)
        if not decodes:
            return _refusal(503, "no decode worker is registered", "no_workers")
        decode = decodes[next(self._turn) % len(decodes)]
        busy.enter_context(self._router.fleet.busy(decode))
        return _Picked(self._endpoint(decode), Route(decode=decode, prefill=None))

    @contextlib.contextmanager
    def _busy(self, route: Route) -> Iterator[None]:
        """The route's workers count as busy in the router while the request runs."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._router.fleet.busy(route.decode))
            if route.prefill is not None:
                stack.enter_context(self._router.fleet.busy(route.prefill, route.uncached_tokens))
            yield

    def _decodes(self, subset: list[str] | None) -> list[pb.WorkerInfo]:
        """The decode workers the gateway allows (all, without a subset)."""
        return [w for w in self._router.fleet.workers.values() if w.role == pb.WORKER_ROLE_DECODE
                and (subset is None or self._endpoint(w) in subset)]

    def _outside(self, subset: list[str] | None) -> list[str]:
        """Decode workers outside the gateway's subset, which the pick leaves out."""
        if subset is None:
            return []
        return [w.worker_id for w in self._router.fleet.workers.values()
                if w.role == pb.WORKER_ROLE_DECODE and self._endpoint(w) not in subset]

    def _endpoint(self, worker: pb.WorkerInfo) -> str:
        """The frontend beside `worker`: its host, the pool's target port."""
        host = worker.endpoint.rpartition(":")[0]
        return f"{host}:{self._target_port}"


@dataclass(frozen=True)
class _Picked:
    """Where the request runs, and the endpoint Envoy sends it to."""

    endpoint: str
    route: Route


def _routing(picked: _Picked) -> ext_pb.CommonResponse:
    decode, prefill = picked.route.decode, picked.route.prefill
    headers = {DESTINATION_HEADER: picked.endpoint, PickedPair.DECODE_HEADER: decode.worker_id}
    if prefill is not None:
        headers[PickedPair.PREFILL_HEADER] = prefill.worker_id
    mutation = ext_pb.HeaderMutation(set_headers=[
        core_pb.HeaderValueOption(header=core_pb.HeaderValue(key=key, raw_value=value.encode()),
                                  append_action=core_pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        for key, value in headers.items()])
    if prefill is None:  # a client's own header must not pick a prefill worker
        mutation.remove_headers.append(PickedPair.PREFILL_HEADER)
    return ext_pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)


def _lb_metadata(picked: _Picked) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: picked.endpoint}})
    return metadata


def _refusal(status: int, message: str, code: str, param: str | None = None) -> ext_pb.ProcessingResponse:
    """An answer Envoy sends the client in place of the upstream's, OpenAI-shaped."""
    return ext_pb.ProcessingResponse(immediate_response=ext_pb.ImmediateResponse(
        status=http_pb.HttpStatus(code=status),
        body=json.dumps(error_body(status, message, code, param)).encode(),
        headers=ext_pb.HeaderMutation(set_headers=[core_pb.HeaderValueOption(
            header=core_pb.HeaderValue(key="content-type", raw_value=b"application/json"))]),
        details=code))


def _passed(message: ext_pb.ProcessingRequest, duplex: bool) -> ext_pb.ProcessingResponse:
    """The response phase (and trailers) go through unchanged."""
    kind = message.WhichOneof("request")
    if kind == "response_body" and duplex:  # full duplex: the body is streamed back, chunk by chunk
        return _body_passed(message.response_body.body, message.response_body.end_of_stream, response=True)
    answer: Any = {"request_headers": ext_pb.HeadersResponse, "response_headers": ext_pb.HeadersResponse,
                   "response_body": ext_pb.BodyResponse, "request_trailers": ext_pb.TrailersResponse,
                   "response_trailers": ext_pb.TrailersResponse}[kind]()
    return ext_pb.ProcessingResponse(**{kind: answer})


def _body_passed(body: bytes, end_of_stream: bool, *, response: bool = False) -> ext_pb.ProcessingResponse:
    streamed = ext_pb.BodyResponse(response=ext_pb.CommonResponse(body_mutation=ext_pb.BodyMutation(
        streamed_response=ext_pb.StreamedBodyResponse(body=body, end_of_stream=end_of_stream))))
    return ext_pb.ProcessingResponse(**{"response_body" if response else "request_body": streamed})


def _header(headers: core_pb.HeaderMap, name: str) -> str:
    for header in headers.headers:
        if header.key == name:
            return header.raw_value.decode() if header.raw_value else header.value
    return ""


def _subset(metadata: core_pb.Metadata) -> list[str] | None:
    """The endpoints the gateway allows for this request, when it says (`envoy.lb.subset_hint`)."""
    hint = metadata.filter_metadata.get(SUBSET_NAMESPACE)
    if hint is None or SUBSET_KEY not in hint.fields:
        return None
    return [str(value) for value in hint[SUBSET_KEY]]
