"""Input a careless or hostile client may send, over real sockets: each gets a precise refusal (HTTP 400 with
an actionable message, or a gRPC status with its ErrorInfo reason), never a 500, INTERNAL or UNKNOWN."""

from __future__ import annotations

import asyncio
import tracemalloc
import zlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from dynamo_grpc.client import GenerateStream, params
from dynamo_grpc.errors import from_rpc_error
from dynamo_grpc.frontend.backends import RemoteRouter
from dynamo_grpc.frontend.http import MAX_HTTP_REQUEST_ID_CHARS, start_frontend
from dynamo_grpc.kv.wire import PULL_KV_METHOD
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from tests.cluster import KV_KEY, MODEL, Served, Stubs, openai_frontend, rpc_failure, running

INVALID = grpc.StatusCode.INVALID_ARGUMENT
JSON = {"Content-Type": "application/json"}
SERVICE_NAME = PULL_KV_METHOD.split("/")[1]


@pytest.fixture
async def stubs() -> AsyncIterator[Stubs]:
    async with running() as deployed:
        yield deployed


@pytest.fixture
async def served(stubs: Stubs) -> AsyncIterator[Served]:
    async with openai_frontend(stubs) as frontend:
        yield frontend


def _body(**fields: str) -> bytes:
    """A completions body with `fields` spliced in as raw JSON text."""
    parts = [f'"model": "{MODEL}"', '"prompt": "hi"', *(f'"{name}": {raw}' for name, raw in fields.items())]
    return ("{" + ", ".join(parts) + "}").encode()


HTTP_CASES = {
    "lone surrogate in the prompt": (_body(prompt='"a\\ud800b"'), "surrogate"),
    "lone surrogate in the model": (_body(model='"\\udfff"'), "surrogate"),
    "lone surrogate in a stop string": (_body(stop='["\\ud800"]'), "surrogate"),
    "JSON nested 100,000 deep": (_body(prompt="[" * 100_000 + "]" * 100_000), "nested"),
    "JSON nested 900 deep where a number goes": (_body(max_tokens="[" * 900 + "]" * 900), "nested"),
    "an integer of 5,000 digits": (_body(max_tokens="9" * 5000), "digits"),
    "a seed past 64 bits": (_body(seed=str(2**64)), "seed"),
    "a negative n": (_body(n="-1"), "`n`"),
    "a temperature past a float": (_body(temperature="1" + "0" * 400), "temperature"),
}


@pytest.mark.parametrize("case", HTTP_CASES, ids=str)
async def test_http_bad_json_is_400(served: Served, case: str) -> None:
    body, says = HTTP_CASES[case]
    response = await served.http.post("/v1/completions", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]


async def test_http_chat_surrogate_is_400(served: Served) -> None:
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "\\ud83d"}}]}}'
    response = await served.http.post("/v1/chat/completions", content=body, headers=JSON)
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"], response.text


async def test_http_invalid_deflate_body_is_400(served: Served) -> None:
    for encoding, body in (("deflate", b"not deflate at all"), ("gzip", b"not gzip"),
                           ("deflate", zlib.compress(_body())[:-6])):
        response = await served.http.post("/v1/completions", content=body,
                                          headers={**JSON, "Content-Encoding": encoding})
        assert response.status_code == 400, (encoding, response.text)
        assert encoding in response.json()["error"]["message"]


@pytest.mark.parametrize("request_id", [b"\xff\xfe-not-utf8", b"x" * (MAX_HTTP_REQUEST_ID_CHARS + 1), b"tab\there"],
                         ids=["not UTF-8", "too long", "not printable"])
async def test_http_bad_request_id_is_400(served: Served, request_id: bytes) -> None:
    response = await served.http.post("/v1/completions", content=_body(),
                                      headers={**JSON, "X-Request-Id": request_id})  # type: ignore[dict-item]
    assert response.status_code == 400, response.text
    assert "X-Request-Id" in response.json()["error"]["message"]
    assert response.headers.get("X-Request-Id", "").encode() != request_id
    good = await served.http.post("/v1/completions", content=_body(max_tokens="2"),
                                  headers={**JSON, "X-Request-Id": "x" * MAX_HTTP_REQUEST_ID_CHARS})
    assert good.status_code == 200 and good.headers["X-Request-Id"] == "x" * MAX_HTTP_REQUEST_ID_CHARS


async def test_idle_and_partial_connections_are_closed(stubs: Stubs) -> None:
    remote = RemoteRouter(stubs.deployment.router.endpoint)
    frontend = await start_frontend(remote, stubs.deployment.router.registry, host="127.0.0.1", port=0,
                                    idle_timeout_s=0.5, body_timeout_s=0.5)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n")
    try:
        async def left_open(sent: bytes) -> bytes:
            """What the server answers before it closes a connection that sent only `sent`."""
            reader, writer = await asyncio.open_connection("127.0.0.1", frontend.port)
            writer.write(sent)
            try:
                return await asyncio.wait_for(reader.read(), 5.0)  # read() returns once the server closes
            finally:
                writer.close()

        idle, partial_head, partial_body = await asyncio.gather(
            left_open(b""), left_open(head), left_open(head + b'\r\n{"model": '))
        assert idle == partial_head == b""
        assert partial_body.startswith(b"HTTP/1.1 408") and b"request_timeout" in partial_body
    finally:
        await frontend.stop()
        await remote.close()


async def test_two_concurrent_long_request_ids_both_refused(stubs: Stubs) -> None:
    long_id = "r" * 8000

    async def one() -> tuple[grpc.StatusCode, str]:
        return await rpc_failure(GenerateStream(stubs.router.stub, long_id, params("hi", model=MODEL)).collect())

    assert await asyncio.gather(one(), one()) == [(INVALID, "BAD_REQUEST_ID")] * 2
    prefill = prefill_pb.PrefillRequest(request_id=long_id, params=params("hi", model=MODEL))
    assert await rpc_failure(stubs.prefill.Prefill(prefill)) == (INVALID, "BAD_REQUEST_ID")
    assert await rpc_failure(_decode(stubs, decode_pb.DecodeStart(params=params("hi", model=MODEL)),
                                     request_id=long_id)) == (INVALID, "BAD_REQUEST_ID")


async def _decode(stubs: Stubs, start: decode_pb.DecodeStart, request_id: str = "d") -> None:
    async def requests():
        yield decode_pb.DecodeRequest(request_id=request_id, start=start)

    async for _ in stubs.decode.Decode(requests()):
        pass


@pytest.mark.parametrize("deadline", [timestamp_pb2.Timestamp(seconds=2**62), timestamp_pb2.Timestamp(nanos=-1),
                                      timestamp_pb2.Timestamp(seconds=-2**62)], ids=["huge", "negative nanos",
                                                                                    "before year 1"])
async def test_deadline_out_of_range(stubs: Stubs, deadline: timestamp_pb2.Timestamp) -> None:
    p = params("hi", model=MODEL)
    p.deadline.CopyFrom(deadline)
    assert await rpc_failure(GenerateStream(stubs.router.stub, "", p).collect()) == (INVALID, "BAD_DEADLINE")
    prefill = prefill_pb.PrefillRequest(request_id="p", params=p)
    assert await rpc_failure(stubs.prefill.Prefill(prefill)) == (INVALID, "BAD_DEADLINE")
    assert await rpc_failure(_decode(stubs, decode_pb.DecodeStart(params=p))) == (INVALID, "BAD_DEADLINE")


async def _prefill(stubs: Stubs, prompt: str = "abc") -> pb.KvHandle:
    request = prefill_pb.PrefillRequest(request_id="p", params=params(prompt, model=MODEL))
    return (await stubs.prefill.Prefill(request)).kv_handle


async def _release(stubs: Stubs, handle: pb.KvHandle) -> None:
    await stubs.kv.ReleaseKv(kv_pb.ReleaseKvRequest(transfer_id=handle.transfer_id, pull_token=handle.pull_token))


async def test_non_ascii_pull_token_is_permission_denied(stubs: Stubs) -> None:
    handle = await _prefill(stubs)

    async def pull() -> None:
        request = kv_pb.PullKvRequest(request_id="p", transfer_id=handle.transfer_id, pull_token="jeton-é")
        async for _ in stubs.kv.PullKv(request):
            pass

    assert await rpc_failure(pull()) == (grpc.StatusCode.PERMISSION_DENIED, "BAD_PULL_TOKEN")
    release = kv_pb.ReleaseKvRequest(transfer_id=handle.transfer_id, pull_token="ключ")
    assert await rpc_failure(stubs.kv.ReleaseKv(release)) == (grpc.StatusCode.PERMISSION_DENIED, "BAD_PULL_TOKEN")
    await _release(stubs, handle)


async def test_empty_kv_handle_endpoint(stubs: Stubs) -> None:
    handle = await _prefill(stubs)
    forged = pb.KvHandle()
    forged.CopyFrom(handle)
    forged.endpoint = ""
    KV_KEY.sign(forged)  # the deployment's own prefill worker handed out such a handle
    start = decode_pb.DecodeStart(params=params("abc", model=MODEL), kv_handle=forged)
    assert await rpc_failure(_decode(stubs, start)) == (INVALID, "BAD_KV_HANDLE")
    await _release(stubs, handle)


async def test_malformed_pull_response_is_data_loss(stubs: Stubs) -> None:
    """A KV source that answers PullKv with bytes that are no PullKvResponse."""

    async def garbage(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"\x0a\xff\xff\xff"  # field 1 as length-delimited, its length running past the message

    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {"PullKv": grpc.unary_stream_rpc_method_handler(
        garbage)})
    source = grpc.aio.server()
    source.add_generic_rpc_handlers((handler,))
    port = source.add_insecure_port("127.0.0.1:0")
    await source.start()
    handle = await _prefill(stubs)
    forged = pb.KvHandle()
    forged.CopyFrom(handle)
    forged.endpoint, forged.host, forged.shm_segment = f"127.0.0.1:{port}", "", ""
    forged.ClearField("nixl")  # only the PullKv stream reaches the bytes
    KV_KEY.sign(forged)  # a prefill worker of the deployment that misbehaves
    start = decode_pb.DecodeStart(params=params("abc", model=MODEL), kv_handle=forged)
    try:
        assert await rpc_failure(_decode(stubs, start)) == (grpc.StatusCode.DATA_LOSS, "KV_TRANSFER_CORRUPT")
    finally:
        await source.stop(None)
        await _release(stubs, handle)



async def test_list_workers_with_an_unknown_role(stubs: Stubs) -> None:
    async with grpc.aio.insecure_channel(stubs.deployment.control_plane.endpoint) as channel:
        control = cp_grpc.ControlPlaneServiceStub(channel)
        assert await rpc_failure(control.ListWorkers(cp_pb.ListWorkersRequest(role=99))) == (INVALID, "BAD_ROLE")
        assert len((await control.ListWorkers(cp_pb.ListWorkersRequest())).workers) == 2


UNDECODABLE = b"\x0a\xff\xff\xff\xff"  # field 1, a length past the end


@pytest.mark.parametrize("method,kind", [("/dynamo_grpc.v1.PrefillService/Prefill", "unary"),
                                         ("/dynamo_grpc.v1.KvTransferService/PullKv", "server stream"),
                                         ("/dynamo_grpc.v1.DecodeService/Decode", "bidi"),
                                         ("/dynamo_grpc.v1.RouterService/Generate", "bidi")])
async def test_undecodable_request_bytes(stubs: Stubs, method: str, kind: str) -> None:
    endpoint = (stubs.deployment.router if "Router" in method else
                stubs.deployment.decode if "Decode" in method else stubs.deployment.prefill).endpoint
    async with grpc.aio.insecure_channel(endpoint) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            if kind == "unary":
                await channel.unary_unary(method)(UNDECODABLE)
            elif kind == "server stream":
                async for _ in channel.unary_stream(method)(UNDECODABLE):
                    pass
            else:
                async def requests():
                    yield UNDECODABLE

                async for _ in channel.stream_stream(method)(requests()):
                    pass
    refusal = from_rpc_error(failure.value)
    assert (refusal.code, refusal.reason) == (INVALID, "UNDECODABLE_REQUEST"), refusal.message


@pytest.mark.parametrize("via", ["router", "prefill"])
async def test_huge_prompt_is_refused_before_it_is_tokenized(stubs: Stubs, via: str) -> None:
    """A 10 MB text prompt is CONTEXT_TOO_LONG without the router or the worker making a token per byte
    (a tuple of 10 M ids is 80 MB; the prompt's own copies on the way are 10 MB each)."""
    prompt = "x" * 10_000_000
    tracemalloc.start()
    try:
        if via == "router":
            failure = rpc_failure(GenerateStream(stubs.router.stub, "", params(prompt, model=MODEL)).collect())
        else:
            failure = rpc_failure(stubs.prefill.Prefill(prefill_pb.PrefillRequest(
                request_id="p", params=params(prompt, model=MODEL))))
        assert await failure == (INVALID, "CONTEXT_TOO_LONG")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 70_000_000, f"{peak / 1e6:.0f} MB allocated at the peak"


@pytest.mark.parametrize("prompt", ["abd", [97, 98, 100]], ids=["text", "token ids"])
async def test_handle_for_another_prompt_of_the_same_length(stubs: Stubs, prompt: str | list[int]) -> None:
    """The handle names its prompt by a digest of the token ids, not only by their count."""
    handle = await _prefill(stubs, "abc")
    start = decode_pb.DecodeStart(params=params(prompt, model=MODEL), kv_handle=handle)
    assert await rpc_failure(_decode(stubs, start)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                        "KV_HANDLE_PROMPT_MISMATCH")
    same = decode_pb.DecodeStart(params=params([97, 98, 99], model=MODEL, max_tokens=2), kv_handle=handle)
    await _decode(stubs, same)  # the same prompt as token ids: the KV is taken
    assert (await stubs.prefill_stats()).transfers_completed == 1
