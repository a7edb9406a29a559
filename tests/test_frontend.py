"""The OpenAI-compatible frontend, driven by the real `openai` SDK against a simulated deployment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import openai
import pytest

from dynamo_grpc.engine.simulated import VOCAB_SIZE
from dynamo_grpc.frontend.openai_protocol import chat_prompt, http_status
from dynamo_grpc.tiny_model import CHAT_TEMPLATE
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from tests.bad_input import BadInput, assert_body_limits_hold, assert_refused_by_frontend, bad_inputs
from tests.cluster import FAST_ENGINE, FRONTEND_MODES, MODEL, Served, openai_frontend, running, text_of
from tests.waiting import eventually

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(params=FRONTEND_MODES)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    async with running() as stubs, openai_frontend(stubs, mode=request.param) as served:
        yield served


async def grpc_tokens(served: Served, prompt: str | list[int], max_tokens: int) -> list[int]:
    result = await served.stubs.router.generate(prompt, model=MODEL, max_tokens=max_tokens,
                                                ignore_eos=True).collect()
    return result.token_ids


@pytest.mark.parametrize("prompt", ["Hello, disaggregated world", list(range(1, 40))])
async def test_completion_equals_the_grpc_path(served: Served, prompt: str | list[int]) -> None:
    completion = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, **GREEDY)
    expected = await grpc_tokens(served, prompt, 24)
    choice = completion.choices[0]
    assert choice.token_ids == expected
    assert choice.text == text_of(expected)
    assert choice.finish_reason == "length"
    prompt_tokens = len(prompt.encode()) if isinstance(prompt, str) else len(prompt)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (prompt_tokens, 24, prompt_tokens + 24)
    details = completion.usage.prompt_tokens_details
    assert (details.cached_tokens, details.kv_transferred_tokens) == (0, prompt_tokens)  # KV from prefill
    assert completion.object == "text_completion" and completion.model == MODEL


async def test_streaming_completion_equals_the_grpc_path(served: Served) -> None:
    stream = await served.client.completions.create(model=MODEL, prompt="stream me", max_tokens=30, stream=True,
                                                    **GREEDY)
    chunks = [chunk async for chunk in stream]
    text_chunks = [c for c in chunks if c.choices[0].text]
    assert len(text_chunks) >= 2  # tokens arrive as they are made, not all at the end
    assert [t for c in chunks for t in c.choices[0].token_ids] == await grpc_tokens(served, "stream me", 30)
    assert "".join(c.choices[0].text for c in chunks) == text_of(await grpc_tokens(served, "stream me", 30))
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert len({c.id for c in chunks}) == 1


async def test_chat_stream_with_usage(served: Served) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, stream=True,
        stream_options={"include_usage": True}, **GREEDY)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    *answer, finish, usage = chunks
    assert finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and all(c.usage is None for c in chunks[:-1])
    prompt = "system: be brief\nuser: hi\nassistant:"
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (len(prompt.encode()), 12)
    content = "".join(c.choices[0].delta.content or "" for c in answer)
    assert content == text_of(await grpc_tokens(served, prompt, 12))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].id.startswith("chatcmpl-")


async def test_chat_without_streaming(served: Served) -> None:
    reply = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_tokens=5,
        **GREEDY)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text_of(await grpc_tokens(served, "user: hi\nassistant:", 5))
    assert reply.usage.completion_tokens == 5


def test_the_models_own_template_gives_the_plain_prompt() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(messages, CHAT_TEMPLATE) == chat_prompt(messages, None) == \
        "system: be brief\nuser: hi\nassistant:"


async def test_chat_template_shapes_the_prompt(served: Served) -> None:
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<bot>"
    async with openai_frontend(served.stubs, chat_template=template) as templated:
        reply = await templated.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **GREEDY)
    assert reply.usage.prompt_tokens == len("<user>hi<bot>")
    assert reply.choices[0].message.content == text_of(await grpc_tokens(served, "<user>hi<bot>", 4))


async def test_models_and_health(served: Served) -> None:
    models = await served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await served.http.get("/health")).status_code == 200

    registry = served.stubs.deployment.decode.registry
    await registry.deregister(served.stubs.deployment.decode.worker_id)

    async def unhealthy() -> bool:  # once the frontend's view of the fleet has followed
        return (await served.http.get("/health")).status_code == 503
    await eventually(unhealthy, 5.0, "/health to answer 503")
    health = await served.http.get("/health")
    assert "no decode worker" in health.json()["reason"] and health.json()["registry_connected"] is True
    assert (await served.client.models.list()).data == []
    with pytest.raises(openai.APIStatusError) as refused:  # the router's UNAVAILABLE (NO_WORKERS)
        await served.client.completions.create(model=MODEL, prompt="anyone?", max_tokens=3)
    assert refused.value.status_code == 503 and refused.value.code == "no_workers"
    # An autoscaled deployment at zero is still ready: the next request starts a decode worker.
    await registry.put_document("scale", cp_pb.ScaleTarget(decode_workers=0, version=3).SerializeToString())

    async def scaled_to_zero() -> bool:
        health = await served.http.get("/health")
        return health.status_code == 200 and health.json()["status"] == "scaled_to_zero"
    await eventually(scaled_to_zero, 5.0, "/health to answer scaled_to_zero")
    await registry.delete_document("scale")


async def test_metrics_move(served: Served) -> None:
    requests_ok = 'dynamo_frontend_requests_total{endpoint="/v1/completions",status="200"}'
    series = (requests_ok, f'dynamo_frontend_output_sequence_tokens_sum{{model="{MODEL}"}}',
              f'dynamo_frontend_time_to_first_token_seconds_count{{model="{MODEL}"}}',
              f'dynamo_frontend_time_to_first_token_seconds_bucket{{le="+Inf",model="{MODEL}"}}',
              f'dynamo_frontend_inter_token_latency_seconds_count{{model="{MODEL}"}}',
              f'dynamo_frontend_input_sequence_tokens_count{{model="{MODEL}"}}',
              'dynamo_router_requests_total{outcome="length"}')
    before = {s: await served.metric(s) for s in series}
    await served.client.completions.create(model=MODEL, prompt="count me", max_tokens=7, temperature=0,
                                           extra_body={"ignore_eos": True})
    after = {s: await served.metric(s) for s in series}
    assert {s: after[s] - before[s] for s in series} == {
        requests_ok: 1, series[1]: 7, series[2]: 1, series[3]: 1, series[4]: 1, series[5]: 1, series[6]: 1}
    assert await served.metric("dynamo_frontend_inflight_requests") == 0
    response = await served.http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE dynamo_frontend_time_to_first_token_seconds histogram" in response.text


async def test_request_id_is_honoured_and_echoed(served: Served) -> None:
    raw = await served.client.completions.with_raw_response.create(
        model=MODEL, prompt="id me", max_tokens=3, extra_headers={"X-Request-Id": "my-request-7"})
    assert raw.headers["x-request-id"] == "my-request-7"
    assert raw.parse().id == "cmpl-my-request-7"

    raw = await served.client.completions.with_raw_response.create(model=MODEL, prompt="id me", max_tokens=3)
    made = raw.headers["x-request-id"]
    assert made and raw.parse().id == f"cmpl-{made}"


async def test_a_live_request_id_cannot_be_reused(served: Served) -> None:
    headers = {"X-Request-Id": "twice"}
    stream = await served.client.completions.create(model=MODEL, prompt="long", max_tokens=5000, stream=True,
                                                    extra_body={"ignore_eos": True}, extra_headers=headers)
    await stream.__anext__()
    with pytest.raises(openai.ConflictError) as refused:
        await served.client.completions.create(model=MODEL, prompt="again", max_tokens=3, extra_headers=headers)
    assert refused.value.code == "request_id_in_use"
    await stream.close()


async def test_bad_requests_get_400_naming_the_field(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await served.client.completions.create(model=MODEL, prompt="hi", n=9)
    assert refused.value.param == "n" and "`n` must be an integer in [1, 8]" in refused.value.message

    with pytest.raises(openai.BadRequestError) as refused:  # checked by the router: BAD_SAMPLING_PARAMS
        await served.client.completions.create(model=MODEL, prompt="hi", temperature=3.0)
    assert refused.value.code == "bad_sampling_params" and "temperature" in refused.value.message

    missing = await served.http.post("/v1/completions", json={"model": MODEL})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    malformed = await served.http.post("/v1/chat/completions", content=b"{not json",
                                       headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    no_messages = await served.http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("case", bad_inputs(FAST_ENGINE.max_model_len, VOCAB_SIZE), ids=lambda case: case.name)
async def test_bad_input_is_400_with_its_reason(served: Served, case: BadInput) -> None:
    await assert_refused_by_frontend(served.http, case, MODEL)


async def test_a_body_over_a_size_limit_is_413_naming_the_limit(served: Served) -> None:
    await assert_body_limits_hold(served.http, MODEL)


def test_resource_exhausted_is_busy_only_when_a_retry_can_help() -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert http_status(exhausted, "WORKER_BUSY") == 429
    assert http_status(exhausted, "KV_CACHE_TOO_SMALL") == 400
    assert http_status(exhausted, "MESSAGE_TOO_LARGE") == 413


async def test_max_tokens_past_the_context_finish_at_its_end(served: Served) -> None:
    completion = await served.client.completions.create(
        model=MODEL, prompt=[5] * (FAST_ENGINE.max_model_len - 8), max_tokens=1000, **GREEDY)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8


async def test_unknown_model_is_404(served: Served) -> None:
    not_found = 'dynamo_frontend_requests_total{endpoint="/v1/completions",status="404"}'
    before = await served.metric(not_found)
    with pytest.raises(openai.NotFoundError) as refused:
        await served.client.completions.create(model="no-such-model", prompt="hi", stream=True)
    assert refused.value.code == "model_not_found" and "no-such-model" in refused.value.message
    assert await served.metric(not_found) == before + 1


async def test_client_disconnect_cancels_the_request_everywhere(served: Served,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dynamo_grpc.services.streams")
    decode_id = served.stubs.deployment.decode.worker_id
    cancelled = ('dynamo_frontend_requests_total{endpoint="/v1/completions",status="499"}',
                 'dynamo_router_requests_total{outcome="cancelled"}',
                 f'dynamo_component_requests_total{{role="decode",worker_id="{decode_id}",'
                 'outcome="cancelled"}')
    before = [await served.metric(series) for series in cancelled]
    # 5000 tokens take the simulated engine over 5 s; the disconnect must end the request long before.
    stream = await served.client.completions.create(model=MODEL, prompt="walk away", max_tokens=5000, stream=True,
                                                    extra_body={"ignore_eos": True},
                                                    extra_headers={"X-Request-Id": "walk-away"})
    received = [await stream.__anext__() for _ in range(5)]
    # Sampling is random here, and an ignored EOS streams as empty text: ask for text, not text in every chunk.
    assert "".join(c.choices[0].text for c in received)
    assert (await served.stubs.decode_stats()).active_requests == 1
    await stream.close()

    relays = served.frontend.frontend.relays
    for _ in range(100):
        if not relays and (await served.stubs.decode_stats()).active_requests == 0:
            break
        await asyncio.sleep(0.02)
    # The cancel went in-band and the router confirmed it: its stream ended (the relay reading it is done)
    # long before the grace after which the frontend would cut the call. A remote router logs the cancel it
    # got; the decode worker logs the one the router sent on, in both modes.
    assert not relays and "request walk-away: client cancelled (client cancelled)" in caplog.messages
    if served.mode == "remote":
        assert "request walk-away: client cancelled (client cancel)" in caplog.messages
    await served.stubs.assert_no_leaks()
    assert await served.metric("dynamo_frontend_inflight_requests") == 0
    # Each layer counted the request once, as cancelled.
    assert [await served.metric(series) for series in cancelled] == [count + 1 for count in before]
