"""Every way a client stops reading or cancels reaches the servers: real router, prefill and decode workers
over sockets, checked on the server side.

A request of 5000 tokens at 5 ms a decode step needs 25 s to finish on its own; the servers must be idle
within IDLE_WITHIN_S of the cancel, with no KV held anywhere, so only a request really stopped passes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from dynamo_grpc.client import GenerateResult, GenerateStream
from dynamo_grpc.v1 import common_pb2 as pb
from tests.cluster import MODEL, Stubs, running
from tests.waiting import eventually

MAX_TOKENS = 5000
IDLE_WITHIN_S = 3.0


@pytest.fixture
async def cluster() -> AsyncIterator[Stubs]:
    async with running(decode_step_s=0.005) as stubs:
        yield stubs


def long_request(stubs: Stubs, request_id: str) -> GenerateStream:
    return stubs.router.generate("stop me", model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True,
                                 request_id=request_id)


async def assert_stopped_everywhere(stubs: Stubs) -> None:
    """The request ended on both workers long before its length, and left no blocks and no held KV."""
    await stubs.until_idle(IDLE_WITHIN_S)
    await stubs.assert_no_leaks()
    assert (await stubs.decode_stats()).requests_finished == 1


class Stop(Exception):
    """Raised in a loop body to leave the loop."""


async def leave_after_first_tokens(stubs: Stubs, stream: GenerateStream, how: str) -> None:
    """Read until the decode worker is generating the request, then stop reading `how`."""
    if how == "break":
        async for response in stream:
            if response.HasField("tokens"):
                assert await stubs.decoding()
                break
        else:
            raise AssertionError("the stream ended before its first tokens")
    elif how == "exception":
        with pytest.raises(Stop):
            async for response in stream:
                if response.HasField("tokens"):
                    assert await stubs.decoding()
                    raise Stop
    elif how == "aclose":
        responses = aiter(stream)
        while not (await anext(responses)).HasField("tokens"):
            pass
        assert await stubs.decoding()
        await responses.aclose()
    else:  # the task reading the stream is cancelled
        reading = asyncio.ensure_future(stream.collect())
        await eventually(stubs.decoding, IDLE_WITHIN_S, "the request to reach the decode worker")
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading


@pytest.mark.parametrize("then_cancel", [True, False], ids=["then-cancel", "no-cancel"])
@pytest.mark.parametrize("how", ["break", "exception", "aclose", "task-cancelled"])
async def test_leaving_the_loop_stops_the_request_on_the_servers(cluster: Stubs, how: str, then_cancel: bool) -> None:
    stream = long_request(cluster, f"leave-{how}")
    # (1) Stop reading once tokens flow; then cancel, or not: a stream nobody reads must not run on.
    await leave_after_first_tokens(cluster, stream, how)
    if then_cancel:
        stream.cancel()
    # (2) The servers stop it at once and free everything; the client's call ended as cancelled.
    await assert_stopped_everywhere(cluster)
    assert await stream.call.code() == grpc.StatusCode.CANCELLED


async def test_cancel_from_another_task_is_confirmed_by_the_router(cluster: Stubs,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dynamo_grpc.services.streams")
    stream = long_request(cluster, "from-another-task")
    first_tokens = asyncio.Event()

    async def read() -> GenerateResult:
        result = GenerateResult()
        async for response in stream:
            if response.HasField("tokens"):
                result.token_ids += response.tokens.token_ids
                first_tokens.set()
            else:
                result.completion = response.completion
        return result

    # (1) One task reads; another cancels once tokens flow.
    reading = asyncio.ensure_future(read())
    await asyncio.wait_for(first_tokens.wait(), IDLE_WITHIN_S)
    assert await cluster.decoding()
    stream.cancel()
    # (2) The reader gets the router's CANCELLED completion, counting exactly the tokens it received.
    result = await asyncio.wait_for(reading, IDLE_WITHIN_S)
    assert result.completion is not None and result.completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert 0 < result.completion.usage.completion_tokens == len(result.token_ids) < MAX_TOKENS
    assert await stream.call.code() == grpc.StatusCode.OK
    # (3) The cancel went in-band to the router and on to the decode worker (each logs the reason it got).
    assert "request from-another-task: client cancelled (client cancel)" in caplog.messages
    assert "request from-another-task: client cancelled (client cancelled)" in caplog.messages
    await assert_stopped_everywhere(cluster)


async def test_closing_during_prefill_stops_the_prefill_and_holds_no_kv() -> None:
    # A slow prefill (10 tokens, 0.5 s) is still running when the reading task is cancelled.
    async with running(prefill_s_per_token=0.05) as stubs:
        stream = stubs.router.generate("0123456789", model=MODEL, max_tokens=10, request_id="close-in-prefill")
        reading = asyncio.ensure_future(stream.collect())
        await eventually(stubs.prefilling, IDLE_WITHIN_S, "the prefill to start")
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        # The prefill was aborted, not finished: no KV was ever held, and decode never began.
        await stubs.until_idle(IDLE_WITHIN_S)
        await stubs.assert_no_leaks()
        prefill, decode = await stubs.prefill_stats(), await stubs.decode_stats()
        assert (prefill.requests_finished, prefill.transfers_completed, prefill.transfers_expired) == (1, 0, 0)
        assert decode.requests_finished == 0
        assert await stream.call.code() == grpc.StatusCode.CANCELLED
