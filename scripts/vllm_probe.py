"""Check that vLLM (CPU build) serves the tiny model and agrees with HF transformers token for token.

Builds the tiny Llama into a temp dir, starts an in-process `AsyncLLM`, generates greedily for a few
prompts, and compares the generated ids with `transformers` `generate(do_sample=False)`. Prints the
engine start time and per-request latency. Exit status 0 only if every prompt matches.

    python scripts/vllm_probe.py [--inproc-worker]

`--inproc-worker` runs the model in the engine-core process (uni executor) instead of a third
process: one interpreter fewer to spawn, about 10 s less start-up on a 2-core machine. Set
`VLLM_CACHE_ROOT` to a persistent directory to skip vLLM's model-inspection subprocess (another
~10 s) on every start after the first.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time, in a quiet forest"]
MAX_TOKENS = 16


def hf_greedy(model_dir: Path, prompts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) per prompt from HF transformers, the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")
            out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 pad_token_id=tok.pad_token_id)
            n = ids.input_ids.shape[1]
            results.append((ids.input_ids[0].tolist(), out[0, n:].tolist()))
    return results


async def vllm_greedy(
    model_dir: Path, prompts: list[str], inproc_worker: bool
) -> list[tuple[list[int], list[int]]]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers.inputs.preprocess import parse_model_prompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_dir),
        dtype="float32",
        block_size=32,  # the CPU attention backend wants a multiple of 32
        max_model_len=1024,
        max_num_seqs=8,
        enforce_eager=True,  # skip torch.compile: minutes of inductor work on 2 cores
        disable_log_stats=True,
        # On CPU the platform swaps "uni" for "mp" unless VLLM_ENABLE_V1_MULTIPROCESSING=0 (set in main).
        distributed_executor_backend="uni" if inproc_worker else None,
    )
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(args)
    print(f"engine start: {time.perf_counter() - t0:.1f}s", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    results = []
    try:
        for i, prompt in enumerate(prompts):
            t = time.perf_counter()
            # Render through the engine's own tokenizer (the non-deprecated input path).
            (engine_input,) = await engine.renderer.render_cmpl_async(
                [parse_model_prompt(engine.model_config, prompt)])
            final = None
            async for out in engine.generate(engine_input, params, request_id=f"probe-{i}"):
                final = out
            assert final is not None and final.finished
            print(f"request {i}: {(time.perf_counter() - t) * 1000:.0f} ms "
                  f"for {len(final.outputs[0].token_ids)} tokens", flush=True)
            results.append((list(final.prompt_token_ids), list(final.outputs[0].token_ids)))
    finally:
        engine.shutdown()
        # Drop the engine while the interpreter is intact: its __del__ calls shutdown() again, and
        # at interpreter exit that fails on half-torn-down module globals.
        del engine
        gc.collect()
    return results


def main() -> int:
    from dynamo_grpc.tiny_model import build_tiny_model

    wall = time.perf_counter()
    inproc_worker = "--inproc-worker" in sys.argv[1:]
    if inproc_worker:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with tempfile.TemporaryDirectory(prefix="vllm-probe-") as tmp:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a share of RAM
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
        t = time.perf_counter()
        model_dir = build_tiny_model(Path(tmp) / "tiny-llama")
        print(f"build: {time.perf_counter() - t:.1f}s", flush=True)

        t = time.perf_counter()
        reference = hf_greedy(model_dir, PROMPTS)
        print(f"hf generate ({len(PROMPTS)} prompts): {time.perf_counter() - t:.1f}s", flush=True)
        got = asyncio.run(vllm_greedy(model_dir, PROMPTS, inproc_worker))

    ok = True
    for prompt, (hf_prompt, hf_ids), (vl_prompt, vl_ids) in zip(PROMPTS, reference, got):
        same = hf_prompt == vl_prompt and hf_ids == vl_ids
        ok &= same
        print(f"{'MATCH' if same else 'DIFF '} {prompt!r}")
        print(f"  hf   {hf_prompt} -> {hf_ids}\n  vllm {vl_prompt} -> {vl_ids}")
    print(f"all match: {ok}; probe wall time {time.perf_counter() - wall:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
