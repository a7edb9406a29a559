"""The vLLM adapter of the Engine protocol, over vLLM's in-process async engine (`AsyncLLM`).

Three modes, chosen per request:
- aggregated: a plain vLLM generation;
- prefill (`produce_kv`): one token with our KV connector saving the prompt's blocks into shared memory,
  which the worker's `LeasedKvStore` then leases to one decode worker;
- decode (`kv_handle`): the prompt's KV comes from a prefill worker, read in place from its shared memory
  when both run on one host, else read by NIXL or pulled over gRPC into a local segment; the connector
  writes it into vLLM's paged cache before the step that recomputes the last prompt token.
The engine core never touches the network; see `vllm_connector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_grpc.engine import cpu_cores
from dynamo_grpc.engine.base import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    check_kv_roles,
    check_prompt,
    check_stop_token_ids,
    within_context,
)
from dynamo_grpc.engine.vllm_kv_events import VllmKvEvents, new_endpoint
from dynamo_grpc.errors import AlreadyExists, DynamoError, InvalidArgument
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.events import KvEventLog
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import KvReceiver, layout_bytes
from dynamo_grpc.tiny_model import DEFAULT_MODEL_DIR
from dynamo_grpc.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

CONNECTOR_NAME = "DynamoKvConnector"
CONNECTOR_MODULE = "dynamo_grpc.engine.vllm_connector"

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}
# An abandoned prefill's segment may still be written by the engine step in flight; unlink it again later.
_LATE_UNLINK_S = 5.0
# vLLM's engine processes take seconds to exit, most of it Python's final garbage collection of torch and
# vLLM; vLLM waits 5 s for them, less than that on a busy CPU, then kills them with a warning.
_ENGINE_EXIT_S = 30


@dataclass(frozen=True)
class VllmEngineConfig:
    """Engine arguments that matter on a CPU box; defaults suit the tiny local Llama."""

    model_path: str = str(DEFAULT_MODEL_DIR)
    served_model_name: str = ""
    dtype: str = "float32"
    block_size: int = 32
    max_model_len: int = 2048
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 0
    """Tokens per engine step; longer prompts prefill in chunks. 0 keeps vLLM's default."""
    kv_cache_gib: int = 1
    tensor_parallel_size: int = 1
    """Engine ranks, one process each (vLLM's multiprocess executor); each rank moves its own KV shard."""
    enforce_eager: bool = True
    extra_args: tuple[str, ...] = ()
    """Any other vLLM engine argument, as KEY=VALUE (`--vllm-arg`); VALUE is read as YAML (8, true, fp8)."""
    cpus: str = ""
    """CPU ids (`0-7`) the engine's processes and threads run on, on vLLM's CPU backend; empty keeps vLLM's
    own binding. A VLLM_CPU_OMP_THREADS_BIND in the environment wins over it."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.cpus:
            try:
                cpu_cores.parse(self.cpus)
            except ValueError as error:
                raise ValueError(f"cpus: {error}") from None

    @property
    def model(self) -> str:
        return self.served_model_name or Path(self.model_path).name


def _set_cpu_defaults(config: VllmEngineConfig) -> None:
    """vLLM-CPU refuses to start without a KV cache size, there is no hub to reach, and an engine's worker
    process needs more than vLLM's 5 s to exit on a busy CPU."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", str(_ENGINE_EXIT_S))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "dynamo-grpc" / "vllm"))


_BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


@contextlib.contextmanager
def _on_cores(cpus: str, ranks: int = 1) -> Iterator[None]:
    """Engine processes started inside run on `cpus` only, and vLLM-CPU's automatic binding places their
    OpenMP threads there.

    CPU affinity is per thread and a process inherits the one of the thread that starts it, so this
    narrows the calling thread's for the duration. vLLM-CPU's automatic binding wants a NUMA node per
    tensor-parallel rank; with fewer nodes, the cores are split between the ranks here, in the
    VLLM_CPU_OMP_THREADS_BIND the engine process inherits (see `_rank_binding`). The environment is one per
    process, so such an engine starts alone among the engines of this process (`serve`); others start side
    by side (`_starts`). A VLLM_CPU_OMP_THREADS_BIND of the user's wins.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        yield
        return
    with _starts.entered(alone=ranks > 1):
        if _BIND_VARIABLE in os.environ:  # the user's: ours is set only while nothing else starts
            if cpus or ranks > 1:
                log.info("%s=%s is set: vLLM binds the engine's threads as it says (cpus %s unused)",
                         _BIND_VARIABLE, os.environ[_BIND_VARIABLE], cpus)
            yield
            return
        usable = os.sched_getaffinity(0)
        wanted = set(cpu_cores.parse(cpus)) if cpus else usable
        if not wanted <= usable:
            raise ValueError(f"--cpus {cpus}: this process may run only on CPUs "
                             f"{cpu_cores.format_list(sorted(usable))}")
        if ranks > 1:
            os.environ[_BIND_VARIABLE] = _rank_binding(sorted(wanted), ranks)
        os.sched_setaffinity(0, wanted)
        try:
            yield
        finally:
            os.sched_setaffinity(0, usable)
            if ranks > 1:
                del os.environ[_BIND_VARIABLE]


class _EngineStarts:
    """vLLM-CPU engines of this process as they start: side by side, except that one started `alone` (its
    VLLM_CPU_OMP_THREADS_BIND in the process's environment must not reach another) waits for the others
    to finish starting, and they for it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._starting = 0
        self._alone = False

    @contextlib.contextmanager
    def entered(self, *, alone: bool) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone and not (alone and self._starting))
            self._starting += 1
            self._alone = alone
        try:
            yield
        finally:
            with self._changed:
                self._starting -= 1
                self._alone = False
                self._changed.notify_all()


_starts = _EngineStarts()


def _rank_binding(cores: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` tensor-parallel ranks: consecutive equal groups of `cores`,
    `|` between ranks."""
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size {ranks}: each rank needs a CPU of its own, and this engine "
                         f"may use {len(cores)} ({cpu_cores.format_list(cores)})")
    per_rank = len(cores) // ranks
    return "|".join(cpu_cores.format_list(cores[r * per_rank:(r + 1) * per_rank]) for r in range(ranks))


# Engine arguments this adapter sets itself, from its own settings or because the KV path depends on them.
_OWN_ARGS = {"model": "--model-path", "served_model_name": "--model", "dtype": "--dtype",
             "block_size": "--block-size", "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
             "max_num_batched_tokens": "--max-num-batched-tokens", "enforce_eager": "",
             "tensor_parallel_size": "--tensor-parallel-size",
             "disable_log_stats": "", "kv_transfer_config": "", "kv_events_config": ""}


_SINGLE_RANK_ARGS = ("pipeline_parallel_size", "data_parallel_size")


def planned_args(model: str, kv_memory_gb: float, batch_limit: int, block_size: int
                 ) -> tuple[dict[str, object], dict[str, object]]:
    """A planned pool of vLLM workers runs the calibrated dtype, and batches no more sequences than the
    plan's KV memory held."""
    return {"dtype": "bfloat16"}, {"max_num_seqs": batch_limit}


def extra_engine_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--vllm-arg KEY=VALUE` pairs as vLLM engine arguments; a key vLLM does not know is refused by name."""
    import difflib

    import yaml
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--vllm-arg expects KEY=VALUE, got {pair!r}")
        if key in _OWN_ARGS:
            own = _OWN_ARGS[key]
            raise ValueError(f"--vllm-arg {key}: " + (f"use {own}" if own else "set by dynamo-grpc itself"))
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"--vllm-arg {key}: not a vLLM engine argument"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
        args[key] = yaml.safe_load(raw) if raw.strip() else ""
        if key in _SINGLE_RANK_ARGS and args[key] not in (1, None):
            raise ValueError(f"--vllm-arg {key}: a worker splits its engine by tensor parallelism only "
                             f"(--tensor-parallel-size), since our KV connector moves one shard per tensor-"
                             f"parallel rank; run more workers instead")
    return args


def kv_shards(ranks: int, total_kv_heads: int, kv_heads_per_rank: int) -> list[pb.KvShard]:
    """Which KV heads each tensor-parallel rank holds: consecutive equal splits, or with fewer heads than
    ranks, each head on `ranks / total_kv_heads` consecutive ranks (vLLM replicates them)."""
    return [pb.KvShard(rank=rank, num_kv_heads=kv_heads_per_rank,
                       first_kv_head=rank * kv_heads_per_rank if total_kv_heads >= ranks
                       else rank * total_kv_heads // ranks)
            for rank in range(ranks)]


def _refusals() -> tuple[type[Exception], ...]:
    """What vLLM raises when it refuses a request it was handed."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError, ValueError


def _invalid_argument(error: Exception, rid: str) -> InvalidArgument:
    message = str(error.args[0]) if error.args else str(error)  # without vLLM's "(parameter=..., value=...)"
    return InvalidArgument(message, request_id=rid, reason=_reason_of(error, message))


def _reason_of(error: Exception, message: str) -> str:
    """Prompt refusals by what they say; the rest are about sampling values (their `parameter` names the field)."""
    parameter = getattr(error, "parameter", None)
    if parameter in ("input_tokens", "input_text") or "maximum model length" in message:
        return "CONTEXT_TOO_LONG"  # input_text: a text prompt longer than the context could hold, before tokenizing
    if parameter is None and "out of vocabulary" in message:
        return "TOKEN_OUT_OF_VOCABULARY"
    if parameter is None and "cannot be empty" in message:
        return "EMPTY_PROMPT"
    return "BAD_SAMPLING_PARAMS"


class VllmEngine:
    kind = "vllm"

    def __init__(self, config: VllmEngineConfig, *, kv_store: LeasedKvStore | None = None,
                 kv_receiver: KvReceiver | None = None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`loop`, the worker's event loop, receives the engine's KV cache events; without it none are reported."""
        import vllm
        from vllm.config import KVEventsConfig, KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        _set_cpu_defaults(config)
        removed = shm.sweep()
        if removed:
            log.info("removed %d KV segments left by workers that are gone", removed)
        self.config = config
        self.model = config.model
        self._engine_stats = _EngineStats()
        events_endpoint = new_endpoint() if loop is not None else ""
        # Weight-loading progress bars only where vLLM's INFO logs show too.
        engine_args = {"use_tqdm_on_load": logging.getLogger("vllm").isEnabledFor(logging.INFO),
                       **extra_engine_args(config.extra_args)}
        with _on_cores(config.cpus, config.tensor_parallel_size):
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
                **engine_args,
                model=config.model_path, served_model_name=config.model, dtype=config.dtype,
                block_size=config.block_size, max_model_len=config.max_model_len,
                max_num_seqs=config.max_num_seqs, tensor_parallel_size=config.tensor_parallel_size,
                max_num_batched_tokens=config.max_num_batched_tokens or None, enforce_eager=config.enforce_eager,
                disable_log_stats=False,  # the per-step stats feed `_EngineStats`
                kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                endpoint=events_endpoint) if events_endpoint else None,
                kv_transfer_config=KVTransferConfig(
                    kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE,
                    kv_role="kv_both", kv_load_failure_policy="fail")),
                stat_loggers=[self._engine_stats.factory])
        vllm_config = self._llm.vllm_config
        model_config, cache = vllm_config.model_config, vllm_config.cache_config
        self._num_layers = model_config.get_num_layers(vllm_config.parallel_config)
        parallel = vllm_config.parallel_config
        kv_heads, head_size = model_config.get_num_kv_heads(parallel), model_config.get_head_size()
        ranks, total_kv_heads = parallel.tensor_parallel_size, model_config.get_total_num_kv_heads()
        self._kv_dtype = config.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
        # All ranks' shards together (ranks holding replicated heads each carry their copy).
        self._bytes_per_token = (2 * self._num_layers * ranks * kv_heads * head_size
                                 * model_config.dtype.itemsize)
        self._max_model_len = model_config.max_model_len
        # Logits are this wide (stop ids index them); prompt ids may also be any id the tokenizer has, as in vLLM.
        self._vocab_size = model_config.get_vocab_size()
        tokenizer = self._llm.renderer.tokenizer
        self._prompt_vocab_size = max(self._vocab_size, tokenizer.max_token_id + 1 if tokenizer else 0)
        self.fingerprint = (
            f"vllm-{vllm.__version__}/{config.model}/{config.dtype}/kv-{self._kv_dtype}/bs{cache.block_size}"
            f"/L{self._num_layers}xH{total_kv_heads}xD{head_size}/tp{ranks}h{kv_heads}")
        self._shards = kv_shards(ranks, total_kv_heads, kv_heads)
        self._store = kv_store
        self._receiver = kv_receiver
        self._live: set[str] = set()
        self._finished = 0
        self.kv_events = KvEventLog(cache.block_size) if loop is not None else None
        self._kv_feed = VllmKvEvents(events_endpoint, self.kv_events, loop) if self.kv_events is not None else None

    def capacity(self) -> pb.WorkerCapacity:
        cache = self._llm.vllm_config.cache_config
        return pb.WorkerCapacity(kv_blocks=cache.num_gpu_blocks or 0, block_size=cache.block_size,
                                 max_batch_size=self.config.max_num_seqs)

    def layout(self, num_tokens: int) -> pb.KvLayout:
        block_size = self.config.block_size
        return pb.KvLayout(block_size=block_size, num_blocks=math.ceil(num_tokens / block_size),
                           bytes_per_token=self._bytes_per_token, num_layers=self._num_layers, dtype=self._kv_dtype)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        rid = request.request_id
        if rid in self._live:
            raise AlreadyExists(f"request id {rid!r} is already running on this worker; use a fresh id",
                                request_id=rid)
        check_kv_roles(request, holds_kv=self._store is not None, pulls_kv=self._receiver is not None)
        check_stop_token_ids(request.sampling, vocab_size=self._vocab_size, request_id=rid)
        self._live.add(rid)
        try:
            engine_input = await self._render(request)
            prompt_tokens = len(engine_input["prompt_token_ids"]) - len(request.resume)
            request = within_context(request, prompt_tokens, self._max_model_len)
            if request.produce_kv:
                outputs = self._prefill(request, engine_input)
            elif request.kv_handle is not None:
                outputs = self._decode(request, request.kv_handle, engine_input)
            else:
                outputs = self._plain(request, engine_input)
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    yield out
        finally:
            self._live.discard(rid)
            self._finished += 1

    async def _render(self, request: EngineRequest) -> Any:
        """The engine's input; a resumed request's prompt is extended by the tokens it already produced."""
        engine_input = await self._render_prompt(request.prompt, request.request_id)
        if request.resume:
            ids = (*engine_input["prompt_token_ids"], *request.resume)
            engine_input = await self._render_prompt(ids, request.request_id)
        return engine_input

    async def _render_prompt(self, prompt: str | tuple[int, ...], rid: str) -> Any:
        """The engine's input, checked: token ids in the vocabulary, room in the context for one more token."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        form: Any = prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        try:
            (engine_input,) = await self._llm.renderer.render_cmpl_async(
                [parse_model_prompt(self._llm.model_config, form)])
        except _refusals() as error:
            raise _invalid_argument(error, rid) from None
        check_prompt(engine_input["prompt_token_ids"], vocab_size=self._prompt_vocab_size,
                     max_model_len=self._max_model_len, request_id=rid)
        return engine_input

    async def _prefill(self, request: EngineRequest, engine_input: Any) -> AsyncIterator[EngineOutput]:
        """One token; the prompt's KV ends up in a leased shared-memory segment."""
        assert self._store is not None
        segment = shm.new_segment_name()
        params = self._sampling(request, max_tokens=1, kv_transfer={"save_to": segment})
        leased = False
        try:
            async for out, saved in self._run(request, engine_input, params):
                if saved:
                    num_tokens = int(saved["num_tokens"])
                    out.kv_handle = await self._store.hold_segment(
                        segment, num_tokens=num_tokens, layout=self.layout(num_tokens), fingerprint=self.fingerprint,
                        prompt=engine_input["prompt_token_ids"][:num_tokens], shards=self._shards)
                    leased = True
                elif out.finish_reason in (FinishReason.LENGTH, FinishReason.STOP):
                    raise DynamoError("the engine finished the prefill without saving its KV; see the worker log",
                                      request_id=request.request_id, reason="KV_SAVE_FAILED")
                yield out
        finally:
            if not leased:
                shm.unlink(segment)
                asyncio.get_running_loop().call_later(_LATE_UNLINK_S, shm.unlink, segment)

    async def _decode(self, request: EngineRequest, handle: pb.KvHandle, engine_input: Any
                      ) -> AsyncIterator[EngineOutput]:
        """Tokens from the prompt's KV, received into a segment of this worker's that the connector reads."""
        assert self._receiver is not None
        prompt = engine_input["prompt_token_ids"]
        kv = await self._receiver.receive(handle, prompt=prompt, max_bytes=layout_bytes(self.layout(len(prompt))),
                                          fingerprint=self.fingerprint, request_id=request.request_id,
                                          into_segment=True, order=request.kv_transports)
        try:
            params = self._sampling(request, kv_transfer={"load_from": kv.segment, "num_tokens": handle.num_tokens})
            loaded = False
            async for out, done in self._run(request, engine_input, params):
                if not loaded:  # the engine's first step has read the segment
                    kv.close()
                    loaded = True
                if out.finish_reason is not None:
                    out.kv_transfer = kv.stats
                    if out.usage is not None:  # vLLM counts the KV our connector loaded as cached hits
                        from_transfer = int((done or {}).get("loaded_tokens", 0))
                        out.usage.cached_tokens = max(out.usage.cached_tokens - from_transfer, 0)
                yield out
        finally:
            kv.close()  # when the request ended before its first step

    async def _plain(self, request: EngineRequest, engine_input: Any) -> AsyncIterator[EngineOutput]:
        async for out, _ in self._run(request, engine_input, self._sampling(request)):
            yield out

    async def _run(self, request: EngineRequest, engine_input: Any, params: Any
                   ) -> AsyncIterator[tuple[EngineOutput, dict[str, Any] | None]]:
        """vLLM's outputs, with the connector's `kv_transfer_params` on the last one."""
        rid = request.request_id
        finished = False
        resumed = len(request.resume)
        completion_tokens = resumed  # counted per output; the usage message is built once, at the end
        out = None
        try:
            async for out in self._llm.generate(engine_input, params, request_id=rid):
                completion = out.outputs[0]
                completion_tokens += len(completion.token_ids)
                result = EngineOutput(list(completion.token_ids), completion.text)
                if completion.logprobs and request.sampling.logprobs is not None:
                    result.logprobs = _logprobs(result.token_ids, completion.logprobs,
                                                request.sampling.logprobs)
                if out.finished:
                    finished = True
                    if completion.finish_reason == "error":
                        raise DynamoError("the engine failed the request (a KV load failed); see the worker log",
                                          request_id=rid, reason="ENGINE_ERROR")
                    result.finish_reason = _FINISH.get(completion.finish_reason or "abort", FinishReason.STOP)
                    result.usage = _usage(out, resumed, completion_tokens)
                yield result, out.kv_transfer_params if out.finished else None
            if not finished:
                yield EngineOutput(finish_reason=FinishReason.CANCELLED,
                                   usage=_usage(out, resumed, completion_tokens)), None
                finished = True
        except _refusals() as error:
            raise _invalid_argument(error, rid) from None
        finally:
            if not finished:
                await self._llm.abort(rid)

    def _sampling(self, request: EngineRequest, *, max_tokens: int | None = None,
                  kv_transfer: dict[str, Any] | None = None) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = request.sampling
        try:
            return SamplingParams(
                max_tokens=max_tokens or s.max_tokens - len(request.resume), temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                seed=s.seed, stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                logprobs=s.logprobs,
                output_kind=RequestOutputKind.DELTA,
                extra_args={"kv_transfer_params": kv_transfer} if kv_transfer else None)
        except _refusals() as error:
            raise _invalid_argument(error, request.request_id) from None

    async def abort(self, request_id: str) -> None:
        if request_id in self._live:
            await self._llm.abort(request_id)

    def stats(self) -> pb.WorkerStats:
        total = self.capacity().kv_blocks
        engine = self._engine_stats
        stats = pb.WorkerStats(active_requests=len(self._live), requests_finished=self._finished,
                               total_kv_blocks=total, used_kv_blocks=round(engine.kv_usage * total),
                               prompt_tokens=engine.prompt_tokens, prefix_cache_hit_tokens=engine.hit_tokens)
        if self._store is not None:
            self._store.add_stats(stats)
        if self._receiver is not None:
            self._receiver.add_stats(stats)
        return stats

    async def shutdown(self) -> None:
        if self._kv_feed is not None:
            self._kv_feed.close()
        # Off the event loop, so other engines and the servers stop meanwhile.
        await asyncio.to_thread(self._llm.shutdown, timeout=_ENGINE_EXIT_S)
        # Its __del__ shuts down again; at interpreter exit that fails on torn-down globals.
        del self._llm
        gc.collect()


def _usage(last: Any, resumed: int, completion_tokens: int) -> pb.Usage:
    """The request's token counts from vLLM's last output (None before the first), the prompt without the
    tokens a resumed request had already produced."""
    prompt_tokens = len(last.prompt_token_ids or ()) - resumed if last is not None else 0
    cached_tokens = min(last.num_cached_tokens or 0, prompt_tokens) if last is not None else 0
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    cached_tokens=cached_tokens)


def _logprobs(token_ids: list[int], positions: Any, top: int) -> list[pb.TokenLogprob]:
    """vLLM's logprobs of new tokens (per position: token id -> Logprob, the sampled token and the `top`
    most likely, each with its rank) as our messages."""
    result = []
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        ranked = sorted((lp.rank, t) for t, lp in position.items() if lp.rank is not None and lp.rank <= top)
        result.append(pb.TokenLogprob(logprob=chosen.logprob, token=chosen.decoded_token or "", top_logprobs=[
            pb.TopLogprob(token_id=t, token=position[t].decoded_token or "", logprob=position[t].logprob)
            for _, t in ranked]))
    return result


class _EngineStats:
    """The engine's latest KV cache usage (0..1) and its prefix-cache hits since start, from vLLM's
    per-step scheduler stats."""

    def __init__(self) -> None:
        self.kv_usage = 0.0
        self.prompt_tokens = 0
        self.hit_tokens = 0

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        totals = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    totals.kv_usage = scheduler_stats.kv_cache_usage
                    totals.prompt_tokens += scheduler_stats.prefix_cache_stats.queries
                    totals.hit_tokens += scheduler_stats.prefix_cache_stats.hits

            def log_engine_initialized(self) -> None:
                pass

        return Recorder(vllm_config, engine_index)
