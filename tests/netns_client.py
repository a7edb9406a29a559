"""What a test asks of a deployment from inside a test host (`tests/netns.py`): the test's own process has no
address on the hosts' network, so it runs this there and reads the JSON it prints.

    python -m tests.netns_client wait-serving ENDPOINT...        every server's gRPC health says SERVING
    python -m tests.netns_client stats --prefill EP --decode EP  each worker's WorkerStats
    python -m tests.netns_client generate ROUTER MODEL PROMPT    one request through RouterService
    python -m tests.netns_client metrics URL SERIES...           series' values from a /metrics
    python -m tests.netns_client load URL MODEL --concurrency N --seconds S --out FILE
                                                                 closed-loop streaming completions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynamo_grpc.client import RouterClient
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from tests import scrape

PROMPTS = tuple(f"hostile world prompt {k}: " + "lorem ipsum " * (4 + k) for k in range(4))
"""What the load sends, in turn; each has one right answer, whatever path it took."""
REQUEST_TIMEOUT_S = 30.0


async def wait_serving(endpoints: list[str], timeout_s: float) -> dict[str, Any]:
    async def one(endpoint: str) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(endpoint) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{endpoint} not serving after {timeout_s} s")
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one(endpoint) for endpoint in endpoints))
    return {"serving": endpoints}


async def stats(prefills: list[str], decodes: list[str]) -> dict[str, Any]:
    """Each worker's stats by endpoint; a worker that does not answer in 3 s maps to its error."""
    async def one(endpoint: str, role: str) -> tuple[str, Any]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            try:
                if role == "prefill":
                    reply = await prefill_grpc.PrefillServiceStub(channel).GetPrefillStats(
                        prefill_pb.GetPrefillStatsRequest(), timeout=3)
                else:
                    reply = await decode_grpc.DecodeServiceStub(channel).GetDecodeStats(
                        decode_pb.GetDecodeStatsRequest(), timeout=3)
            except grpc.aio.AioRpcError as error:
                return endpoint, {"error": error.code().name}
        return endpoint, MessageToDict(reply.stats, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)

    pairs = await asyncio.gather(*(one(e, "prefill") for e in prefills), *(one(e, "decode") for e in decodes))
    return dict(pairs)


async def generate(router: str, model: str, prompt: str) -> dict[str, Any]:
    async with RouterClient(router) as client:
        result = await client.generate(prompt, model=model, max_tokens=8, ignore_eos=True).collect()
    return {"token_ids": list(result.token_ids),
            "completion": MessageToDict(result.completion, preserving_proto_field_name=True)}


async def metrics(url: str, series: list[str]) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {name: scrape.value(text, name) for name in series}


async def _one_request(session: aiohttp.ClientSession, url: str, model: str, prompt_index: int,
                       max_tokens: int) -> dict[str, Any]:
    """One streamed completion: when it started and ended, its outcome ("ok", an HTTP status, or the code of
    an error event in the stream) and its text."""
    body = {"model": model, "prompt": PROMPTS[prompt_index], "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0,
            "stream": True}
    record: dict[str, Any] = {"prompt": prompt_index, "start": time.time(), "text": ""}
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                record["outcome"] = f"http_{response.status}"
                record["detail"] = (await response.text())[:300]
            else:
                record["outcome"] = "ok"
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        record["outcome"] = f"stream_{event['error'].get('code')}"
                        record["detail"] = event["error"].get("message", "")[:300]
                    else:
                        record["text"] += "".join(c.get("text") or "" for c in event.get("choices", []))
    except asyncio.TimeoutError:
        record["outcome"] = "timeout"
    except aiohttp.ClientError as error:
        record["outcome"] = f"connection_{type(error).__name__}"
    record["end"] = time.time()
    return record


async def load(url: str, model: str, concurrency: int, seconds: float, max_tokens: int, ready: Path
               ) -> list[dict[str, Any]]:
    """`concurrency` clients, each sending its next request when the last ended, for `seconds`; `ready` is
    written when the first request succeeded (a start-up slowed by a busy machine is not part of the load)."""
    records: list[dict[str, Any]] = []
    stop_at = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client(index: int) -> None:
            sent = 0
            while time.monotonic() < stop_at:
                prompt = (index + sent) % len(PROMPTS)
                records.append(await _one_request(session, url, model, prompt, max_tokens))
                if records[-1]["outcome"] == "ok" and not ready.exists():
                    ready.write_text("ready")
                sent += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return records


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="netns_client")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("wait-serving")
    sub.add_argument("endpoints", nargs="+")
    sub.add_argument("--timeout", type=float, default=30.0)
    sub = commands.add_parser("stats")
    sub.add_argument("--prefill", action="append", default=[])
    sub.add_argument("--decode", action="append", default=[])
    sub = commands.add_parser("generate")
    sub.add_argument("router")
    sub.add_argument("model")
    sub.add_argument("prompt")
    sub = commands.add_parser("metrics")
    sub.add_argument("url")
    sub.add_argument("series", nargs="+")
    sub = commands.add_parser("load")
    sub.add_argument("url")
    sub.add_argument("model")
    sub.add_argument("--concurrency", type=int, default=6)
    sub.add_argument("--seconds", type=float, default=10.0)
    sub.add_argument("--max-tokens", type=int, default=24)
    sub.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "wait-serving":
        result: Any = asyncio.run(wait_serving(args.endpoints, args.timeout))
    elif args.command == "stats":
        result = asyncio.run(stats(args.prefill, args.decode))
    elif args.command == "generate":
        result = asyncio.run(generate(args.router, args.model, args.prompt))
    elif args.command == "metrics":
        result = asyncio.run(metrics(args.url, args.series))
    else:
        records = asyncio.run(load(args.url, args.model, args.concurrency, args.seconds, args.max_tokens,
                                   Path(args.out + ".ready")))
        Path(args.out).write_text(json.dumps(records))
        result = {"requests": len(records)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
