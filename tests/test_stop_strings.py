"""Stop strings: the matcher on its own, on a real simulated engine, and through the router over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.client import GenerateStream, params
from dynamo_grpc.engine import EngineRequest, FinishReason, Sampling, SimulatedEngine, SimulatedEngineConfig
from dynamo_grpc.engine.base import EngineOutput
from dynamo_grpc.services.stop_strings import StopMatcher, cut_at_stop_strings
from dynamo_grpc.v1 import common_pb2 as pb
from tests.cluster import MODEL, rpc_failure, running


def output(text: str, token: int, finish: FinishReason | None = None) -> EngineOutput:
    return EngineOutput([token], text, finish)


def test_text_that_cannot_start_a_stop_string_passes_at_once() -> None:
    matcher = StopMatcher(("XY",))
    released, stopped = matcher.push(output("ab", 1))
    assert released is not None and (released.text, released.token_ids, stopped) == ("ab", [1], False)
    # "X" may begin "XY": the whole output waits, with its token.
    assert matcher.push(output("cX", 2)) == (None, False)
    # "Xz" does not: both leave, as one output.
    released, stopped = matcher.push(output("z", 3))
    assert released is not None and (released.text, released.token_ids, stopped) == ("cXz", [2, 3], False)


def test_a_stop_string_across_outputs_cuts_the_text_before_it() -> None:
    matcher = StopMatcher(("never", "XYZ"))
    assert matcher.push(output("aX", 1)) == (None, False)
    assert matcher.push(output("Y", 2)) == (None, False)
    released, stopped = matcher.push(output("Zb", 3))
    assert stopped and released is not None
    # The tokens that made the stop string are returned (they were generated); its text is not.
    assert (released.text, released.token_ids) == ("a", [1, 2, 3])


def test_the_earliest_stop_string_wins_and_the_end_flushes_what_was_held() -> None:
    released, stopped = StopMatcher(("zz", "b")).push(output("abzz", 1))
    assert stopped and released is not None and released.text == "a"
    matcher = StopMatcher(("abc",))
    assert matcher.push(output("xa", 1)) == (None, False)
    released, stopped = matcher.push(output("b", 2, FinishReason.LENGTH))
    assert not stopped and released is not None
    assert (released.text, released.token_ids, released.finish_reason) == ("xab", [1, 2], FinishReason.LENGTH)


async def test_a_stop_string_aborts_the_engine_and_usage_counts_what_was_returned() -> None:
    engine = SimulatedEngine(SimulatedEngineConfig(decode_step_s=0.0005, prefill_s_per_token=0.0,
                                                   num_blocks=64))
    sampling = Sampling(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def run(request_id: str, stops: tuple[str, ...]) -> list[EngineOutput]:
        outputs: AsyncIterator[EngineOutput] = engine.generate(EngineRequest(request_id, "stop me", sampling))
        if stops:
            outputs = cut_at_stop_strings(outputs, stops, lambda: engine.abort(request_id))
        return [out async for out in outputs]

    full = "".join(out.text for out in await run("full", ()))
    stop = full[30:34]
    cut = await run("cut", (stop,))
    text, tokens = "".join(out.text for out in cut), sum(len(out.token_ids) for out in cut)
    assert text == full[:full.index(stop)]
    assert cut[-1].finish_reason is FinishReason.STOP and cut[-1].usage is not None
    assert cut[-1].usage.completion_tokens == tokens < 200
    # The last token returned is the one that completed the stop string (one character per token here).
    assert tokens == full.index(stop) + len(stop)
    assert engine.stats().active_requests == 0 and engine.stats().used_kv_blocks == 0


async def test_grpc_clients_get_stop_strings_and_logprobs_through_the_router() -> None:
    async with running() as stubs:
        full = await stubs.router.generate("over grpc", model=MODEL, max_tokens=60, ignore_eos=True).collect()
        stop = full.text[40:43]
        request = params("over grpc", model=MODEL, max_tokens=60, ignore_eos=True)
        request.sampling.stop.append(stop)
        request.sampling.logprobs = 2
        batches, completion = [], None
        async for response in GenerateStream(stubs.router.stub, "stopped", request):
            if response.HasField("tokens"):
                batches.append(response.tokens)
            else:
                completion = response.completion
        assert "".join(b.text for b in batches) == full.text[:full.text.index(stop)]
        assert completion is not None and completion.finish_reason == pb.FINISH_REASON_STOP
        assert completion.usage.completion_tokens == sum(len(b.token_ids) for b in batches)
        assert batches and all(len(b.logprobs) == len(b.token_ids) for b in batches)
        assert all(len(entry.top_logprobs) == 2 for b in batches for entry in b.logprobs)
        # Too many stop strings are refused by the router, for every client.
        request.sampling.stop.extend(["a1", "b2", "c3", "d4"])
        code, reason = await rpc_failure(GenerateStream(stubs.router.stub, "refused", request).collect())
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_SAMPLING_PARAMS")
        await stubs.assert_no_leaks()
