"""Bad input gets a precise status code and an ErrorInfo reason, never a crash or a hang."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from control_plane.deployment import start_all_in_one
from dynamo_grpc.client import GenerateStream, RouterClient, params
from dynamo_grpc.config import ServerConfig
from dynamo_grpc.engine.simulated import VOCAB_SIZE
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.roles import start_router
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from tests.bad_input import BadInput, assert_message_limit_holds, assert_refused_by_router, bad_inputs
from tests.cluster import FAST_ENGINE, KV_KEY, MODEL, Stubs, rpc_failure, worker_config
from tests.waiting import eventually

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture
async def cluster() -> AsyncIterator[Stubs]:
    registry = MemoryRegistry()
    deployment = await start_all_in_one(worker_config(), registry)
    stubs = Stubs(deployment)
    yield stubs
    await stubs.assert_no_leaks()
    await stubs.close()
    await deployment.stop()
    await registry.close()


def generate(stubs: Stubs, p: pb.GenerationParams, request_id: str = ""):
    return GenerateStream(stubs.router.stub, request_id, p).collect()


@pytest.mark.parametrize("case", bad_inputs(FAST_ENGINE.max_model_len, VOCAB_SIZE), ids=lambda case: case.name)
async def test_bad_input_is_refused_with_its_reason(cluster: Stubs, case: BadInput) -> None:
    await assert_refused_by_router(cluster.router.stub, case, MODEL)


async def test_max_tokens_past_the_context_are_clamped(cluster: Stubs) -> None:
    context = FAST_ENGINE.max_model_len
    p = params([5] * (context - 8), model=MODEL, max_tokens=1000, ignore_eos=True)
    result = await generate(cluster, p)
    assert result.completion is not None
    assert result.completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(result.token_ids) == result.completion.usage.completion_tokens == 8


async def test_a_message_over_the_grpc_limit_is_resource_exhausted(cluster: Stubs) -> None:
    await assert_message_limit_holds(cluster.deployment.router.endpoint, MODEL)


async def test_empty_prompt(cluster: Stubs) -> None:
    for prompt in (pb.Prompt(), pb.Prompt(text=""), pb.Prompt(token_ids=pb.TokenIds())):
        p = pb.GenerationParams(model=MODEL, prompt=prompt)
        assert await rpc_failure(generate(cluster, p)) == (INVALID, "EMPTY_PROMPT")


async def test_unknown_model(cluster: Stubs) -> None:
    code, reason = await rpc_failure(generate(cluster, params("hi", model="gpt-unknown")))
    assert (code, reason) == (NOT_FOUND, "MODEL_NOT_FOUND")
    # Workers check too, for callers that reach them directly.
    request = prefill_pb.PrefillRequest(request_id="p", params=params("hi", model="gpt-unknown"))
    assert await rpc_failure(cluster.prefill.Prefill(request)) == (NOT_FOUND, "MODEL_NOT_FOUND")


async def test_past_deadline(cluster: Stubs) -> None:
    p = params("late", model=MODEL)
    p.deadline.CopyFrom(timestamp_pb2.Timestamp(seconds=1))
    code, _ = await rpc_failure(generate(cluster, p))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_deadline_during_generation(cluster: Stubs) -> None:
    p = params("slow", model=MODEL, max_tokens=5000, ignore_eos=True)
    deadline = timestamp_pb2.Timestamp()
    deadline.GetCurrentTime()
    deadline.FromNanoseconds(deadline.ToNanoseconds() + 300_000_000)
    p.deadline.CopyFrom(deadline)
    code, _ = await rpc_failure(generate(cluster, p))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_duplicate_live_request_id(cluster: Stubs) -> None:
    first = cluster.router.generate("one", model=MODEL, max_tokens=5000, ignore_eos=True, request_id="dup")
    responses = aiter(first)
    while not (await anext(responses)).HasField("tokens"):
        pass
    second = generate(cluster, params("two", model=MODEL), request_id="dup")
    assert await rpc_failure(second) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_IN_USE")
    # The refusal left the first request running; a cancel ends it, and the router confirms.
    assert await cluster.decoding()
    first.cancel()
    completion = [r async for r in responses][-1].completion
    assert completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert completion.usage.completion_tokens < 5000
    # An id that has ended may be used again.
    again = await generate(cluster, params("again", model=MODEL, max_tokens=4, ignore_eos=True), "dup")
    assert again.completion.finish_reason == pb.FINISH_REASON_LENGTH and len(again.token_ids) == 4


async def test_stream_must_start_with_a_request(cluster: Stubs) -> None:
    async def requests():
        yield decode_pb.DecodeRequest(request_id="x", cancel=pb.CancelAction())

    assert await rpc_failure(_drain(cluster.decode.Decode(requests()))) == (INVALID, "STREAM_NOT_STARTED")


async def _drain(call) -> None:
    async for _ in call:
        pass


async def decode_with(stubs: Stubs, handle: pb.KvHandle, prompt: str = "abc") -> None:
    async def requests():
        yield decode_pb.DecodeRequest(request_id="d", start=decode_pb.DecodeStart(
            params=params(prompt, model=MODEL), kv_handle=handle))

    await _drain(stubs.decode.Decode(requests()))


async def prefill(stubs: Stubs, prompt: str = "abc") -> pb.KvHandle:
    response = await stubs.prefill.Prefill(prefill_pb.PrefillRequest(request_id="p", params=params(prompt, model=MODEL)))
    return response.kv_handle


async def test_missing_kv_handle(cluster: Stubs) -> None:
    handle = await prefill(cluster)
    bogus = pb.KvHandle()
    bogus.CopyFrom(handle)
    bogus.transfer_id = "no-such-transfer"
    KV_KEY.sign(bogus)  # as the deployment's prefill worker would have (else its MAC refuses it)
    assert await rpc_failure(decode_with(cluster, bogus)) == (NOT_FOUND, "KV_HANDLE_NOT_FOUND")
    await cluster.kv.ReleaseKv(kv_pb.ReleaseKvRequest(transfer_id=handle.transfer_id, pull_token=handle.pull_token))


async def test_wrong_pull_token(cluster: Stubs) -> None:
    handle = await prefill(cluster)
    request = kv_pb.PullKvRequest(request_id="p", transfer_id=handle.transfer_id, pull_token="guess")
    assert await rpc_failure(_drain(cluster.kv.PullKv(request))) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                    "BAD_PULL_TOKEN")
    released = await cluster.kv.ReleaseKv(kv_pb.ReleaseKvRequest(transfer_id=handle.transfer_id,
                                                                 pull_token=handle.pull_token))
    assert released.released


async def test_handle_for_another_prompt(cluster: Stubs) -> None:
    handle = await prefill(cluster, "abc")
    code, reason = await rpc_failure(decode_with(cluster, handle, prompt="abcdef"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KV_HANDLE_PROMPT_MISMATCH")
    await cluster.kv.ReleaseKv(kv_pb.ReleaseKvRequest(transfer_id=handle.transfer_id, pull_token=handle.pull_token))


@pytest.mark.parametrize("policy", ["fail", "local-prefill"])
async def test_expired_kv_handle(policy: str) -> None:
    registry = MemoryRegistry()
    deployment = await start_all_in_one(dataclasses.replace(worker_config(), kv_ttl_s=0.2, kv_pull_failure=policy),
                                        registry)
    stubs = Stubs(deployment)
    handle = await prefill(stubs)

    async def expired() -> bool:
        return (await stubs.prefill_stats()).transfers_expired == 1

    await eventually(expired, 5.0, "the KV lease to expire")
    if policy == "fail":
        assert await rpc_failure(decode_with(stubs, handle)) == (NOT_FOUND, "KV_HANDLE_EXPIRED")
    else:  # the decode worker prefills the prompt itself and answers
        async def requests():
            yield decode_pb.DecodeRequest(request_id="d", start=decode_pb.DecodeStart(
                params=params("abc", model=MODEL, max_tokens=4), kv_handle=handle, prefill_worker_id="p"))

        responses = [r async for r in stubs.decode.Decode(requests())]
        completion = responses[-1].completion
        assert completion.usage.completion_tokens == 4 and completion.finish_reason
        assert completion.kv_transfer.bytes == 0 and completion.prefill_worker_id == ""
    stats = await stubs.prefill_stats()
    assert stats.transfers_expired == 1
    await stubs.assert_no_leaks()
    await stubs.close()
    await deployment.stop()
    await registry.close()


async def test_no_workers() -> None:
    registry = MemoryRegistry()
    router = await start_router(ServerConfig(port=0), registry)
    async with RouterClient(router.endpoint) as client:
        stream = client.generate("anyone?", model=MODEL)
        code, reason = await rpc_failure(stream.collect())
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "NO_WORKERS")
    await router.stop()
    await registry.close()
