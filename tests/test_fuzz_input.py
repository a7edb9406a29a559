"""Seeded random requests, well-formed or not, at the frontend and the router: whatever they hold, the answer
is a result or a refusal by the client's fault (HTTP 4xx; a gRPC code other than INTERNAL or UNKNOWN), and
the deployment serves normally afterwards."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from dynamo_grpc.client import GenerateStream, params
from dynamo_grpc.v1 import common_pb2 as pb
from tests.cluster import MODEL, Served, openai_frontend, running

SEED = 16
CASES = 300
AT_ONCE = 8
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "n", "stop", "stop_token_ids", "stream", "stream_options", "logprobs", "top_logprobs", "echo",
          "ignore_eos", "return_token_ids", "best_of", "presence_penalty", "user")
NASTY_TEXT = ('"\\ud800"', '"\\udfff x"', '"\\u0000"', '"é✓🙂"', '""', '"' + "y" * 5000 + '"')
NASTY_NUMBERS = ("-1", "0", "1", "4294967296", "18446744073709551616", "9" * 5000, "1e400", "-1e400", "NaN",
                 "Infinity", "0.5", "-0.0", "1.5e-320")


def nasty_value(rng: random.Random, depth: int = 0) -> str:
    """Raw JSON text of a value a client might send in any field."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(NASTY_TEXT)
    if kind in (1, 2):
        return rng.choice(NASTY_NUMBERS)
    if kind == 3:
        return rng.choice(("true", "false", "null"))
    if kind == 4:
        return rng.choice(('"hi"', '"' + MODEL + '"', "[1, 2, 3]", '[{"role": "user", "content": "hi"}]'))
    if kind == 5:
        return "[" * 2000 + "]" * 2000
    if kind == 6:
        return "[" + ", ".join(nasty_value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    return "{" + ", ".join(f'"{rng.choice(FIELDS)}": {nasty_value(rng, depth + 1)}'
                           for _ in range(rng.randrange(3))) + "}"


def http_case(rng: random.Random) -> tuple[str, bytes, dict[str, Any]]:
    chat = rng.random() < 0.4
    fields = {"model": f'"{MODEL}"', "max_tokens": "3"}
    fields["messages" if chat else "prompt"] = '[{"role": "user", "content": "hi"}]' if chat else '"hi"'
    for _ in range(rng.randrange(1, 4)):
        fields[rng.choice(FIELDS)] = nasty_value(rng)
    body = ("{" + ", ".join(f'"{name}": {value}' for name, value in fields.items()) + "}").encode()
    if rng.random() < 0.2:  # bytes gone wrong on the way
        cut = rng.randrange(len(body))
        body = body[:cut] + bytes([rng.randrange(256)]) + body[cut + 1:] if rng.random() < 0.5 else body[:cut]
    headers: dict[str, Any] = {"Content-Type": "application/json"}
    if rng.random() < 0.1:
        headers["Content-Encoding"] = rng.choice(("gzip", "deflate", "br", "identity"))
    if rng.random() < 0.1:
        headers["X-Request-Id"] = rng.choice(("x" * 300, "ok-id", "tab\there", "ünï".encode()))
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, headers


def grpc_case(rng: random.Random) -> pb.GenerationParams:
    p = params(rng.choice(["hi", "", "\x00", "é" * 3000, [1, 2, 3], [2**32 - 1], list(range(40))]),
               model=rng.choice([MODEL, "", "m" * 10000, "no-such-model"]), max_tokens=3)
    s = p.sampling
    pick: list[Callable[[], Any]] = [
        lambda: setattr(s, "max_tokens", rng.choice([0, 1, 2**32 - 1])),
        lambda: setattr(s, "temperature", rng.choice([-1.0, float("nan"), float("inf"), 0.0, 1e30])),
        lambda: setattr(s, "top_p", rng.choice([-1.0, 0.0, 2.0, float("nan")])),
        lambda: setattr(s, "top_k", rng.choice([0, 1, 2**32 - 1])),
        lambda: setattr(s, "seed", rng.choice([0, 2**64 - 1])),
        lambda: setattr(s, "logprobs", rng.choice([0, 21, 2**32 - 1])),
        lambda: s.stop.extend(rng.choice([[""], ["a"] * 5, ["z" * 300], ["\x00"]])),
        lambda: s.stop_token_ids.extend(rng.choice([[0], [2**32 - 1]])),
        lambda: p.deadline.FromNanoseconds(rng.choice([1, -1, 2**62, 10**18 * 200])),
        lambda: setattr(p.deadline, "nanos", rng.choice([-1, 10**9, 2**31 - 1])),
    ]
    for _ in range(rng.randrange(3)):
        rng.choice(pick)()
    return p


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with running() as stubs, openai_frontend(stubs) as frontend:
        yield frontend


async def in_batches(cases: list[Any], run: Callable[[Any], Any]) -> list[Any]:
    results = []
    for start in range(0, len(cases), AT_ONCE):
        results += await asyncio.gather(*(run(case) for case in cases[start:start + AT_ONCE]))
    return results


async def test_fuzzed_http_requests_never_get_a_server_error(served: Served) -> None:
    rng = random.Random(SEED)
    cases = [http_case(rng) for _ in range(CASES)]

    async def post(case: tuple[str, bytes, dict[str, Any]]) -> tuple[int, str]:
        path, body, headers = case
        response = await served.http.post(path, content=body, headers=headers, timeout=30)
        return response.status_code, f"{body[:200]!r} {headers} -> {response.text[:300]}"

    results = await in_batches(cases, post)
    faults = [what for status, what in results if status >= 500]
    assert not faults, "\n".join(faults)
    assert {status for status, _ in results} & {200} and {status for status, _ in results} & {400}
    healthy = await served.client.completions.create(model=MODEL, prompt="still here", max_tokens=4)
    assert healthy.usage.completion_tokens == 4


async def test_fuzzed_router_requests_never_get_internal_or_unknown(served: Served) -> None:
    rng = random.Random(SEED)
    cases = [grpc_case(rng) for _ in range(CASES)]
    stub = served.stubs.router.stub

    async def generate(p: pb.GenerationParams) -> tuple[grpc.StatusCode, str]:
        try:
            await asyncio.wait_for(GenerateStream(stub, "", p).collect(), 30)
        except grpc.aio.AioRpcError as error:
            return error.code(), f"{str(p)[:300]} -> {error.code().name} {error.details()}"
        return grpc.StatusCode.OK, ""

    results = await in_batches(cases, generate)
    faults = [what for code, what in results if code in SERVER_FAULTS]
    assert not faults, "\n".join(faults)
    assert {code for code, _ in results} >= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    json.dumps([what for _, what in results])  # every refusal's text is printable as it came
    result = await served.stubs.router.generate("still here", model=MODEL, max_tokens=4).collect()
    assert len(result.token_ids) == 4
    await served.stubs.assert_no_leaks()
