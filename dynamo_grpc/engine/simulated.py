"""A simulated engine: the Engine protocol with timings from a cost model instead of a GPU.

It is faithful where the rest of the system can tell: tokens are a deterministic function of the
prompt's KV bytes (so KV that arrives corrupted or for the wrong prompt changes the output), the KV
cache is paged and bounded, a prefill's blocks stay allocated until its transfer is released or
expires, and abort frees everything. Tokens are bytes; generated ones are printable letters.
Log probabilities, when asked for, are synthetic: a made-up distribution per position, deterministic and
self-consistent (the greedy choice is its most likely token), not a model's.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dynamo_grpc.engine.base import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    check_kv_roles,
    check_prompt,
    check_stop_token_ids,
    check_text_length,
    within_context,
)
from dynamo_grpc.engine.cost_model import (
    KV_BYTES_PER_TOKEN,
    SHAPES,
    check_tensor_parallel_size,
    load_tensor_parallel_cost,
)
from dynamo_grpc.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from dynamo_grpc.kv.events import KvEventLog, block_hashes, prefix_hashes
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import KvReceiver, layout_bytes
from dynamo_grpc.v1 import common_pb2 as pb

VOCAB_SIZE = 257
EOS_TOKEN_ID = 256
_ALPHABET = b" abcdefghijklmnopqrstuvwxyz"
_MASK64 = (1 << 64) - 1
_CANDIDATES = (*_ALPHABET, EOS_TOKEN_ID)  # every token the simulated model generates
_GOLDEN, _MIX = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9  # 64-bit hash constants (splitmix64)


@dataclass(frozen=True)
class SimulatedEngineConfig:
    """Shape and cost of the simulated model; defaults mimic the tiny local Llama on a CPU."""

    model: str = "sim-tiny"
    block_size: int = 32
    num_blocks: int = 4096
    kv_bytes_per_token: int = 4096
    num_layers: int = 4
    max_batch_size: int = 256
    max_model_len: int = 8192
    prefill_s_per_token: float = 20e-6
    decode_step_s: float = 2e-3
    max_num_batched_tokens: int = 2048
    """Tokens per step: decodes first, then one prefill chunk (longer prompts prefill over several steps)."""
    time_scale: float = 1.0
    """Simulated seconds per wall-clock second; above 1 the engine runs faster than real time."""
    cost_model: str = ""
    """Step times: "" for the two settings above, or an H100-calibrated shape: llama3_8b, llama3_70b."""
    prefix_caching: bool = True
    """Reuse the KV of prompt blocks that earlier requests computed."""
    tensor_parallel_size: int = 1
    """GPUs the simulated worker spans: its steps are priced as a TP-N engine (needs a cost_model)."""
    load_s: float = 0.0
    """Seconds (simulated) the engine takes to start, as a real one loads weights: health checks and cold
    starts see a worker that is up but not ready yet."""

    def __post_init__(self) -> None:
        if self.cost_model and self.cost_model not in SHAPES:
            raise ValueError(f"simulated engine: cost_model must be one of {', '.join(SHAPES)} (or empty), "
                             f"got {self.cost_model!r}")
        if self.tensor_parallel_size != 1:
            if not self.cost_model:
                raise ValueError("simulated engine: tensor_parallel_size above 1 needs a cost_model "
                                 f"({', '.join(SHAPES)}) to price its steps")
            check_tensor_parallel_size(self.cost_model, self.tensor_parallel_size)
        if self.time_scale <= 0:
            raise ValueError(f"simulated engine: time_scale must be positive, got {self.time_scale}")
        for name in ("block_size", "num_blocks", "kv_bytes_per_token", "num_layers", "max_batch_size",
                     "max_model_len", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"simulated engine: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("prefill_s_per_token", "decode_step_s", "load_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"simulated engine: {name} must not be negative, got {getattr(self, name)}")


class BlockPool:
    """Counts free KV blocks; requests wait for room instead of failing while others finish."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._room = asyncio.Condition()
        self._waiting = 0

    async def acquire(self, count: int) -> None:
        if self.free >= count:
            self.free -= count
            return
        async with self._room:
            self._waiting += 1
            try:
                await self._room.wait_for(lambda: self.free >= count)
            finally:
                self._waiting -= 1
            self.free -= count

    def release(self, count: int) -> None:
        self.free += count
        if self._waiting:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._room:
            self._room.notify_all()


def planned_args(model: str, kv_memory_gb: float, batch_limit: int, block_size: int
                 ) -> tuple[dict[str, object], dict[str, object]]:
    """A planned pool of simulated workers prices its steps like the calibrated GPU and holds the KV
    blocks that GPU's memory would."""
    blocks = int(kv_memory_gb * 1e9 / KV_BYTES_PER_TOKEN[model] / block_size)
    return {"cost_model": model, "block_size": block_size, "num_blocks": blocks}, {"max_batch_size": batch_limit}


def tokenize(prompt: str | tuple[int, ...]) -> tuple[int, ...]:
    """The simulated model's tokenizer: UTF-8 bytes."""
    return tuple(prompt.encode()) if isinstance(prompt, str) else prompt


_PAD_WORDS = 1 << 17


@functools.cache
def _pad() -> np.ndarray:
    """1 MiB of random 64-bit words that every block's stand-in KV is cut from."""
    return np.frombuffer(np.random.default_rng(0).bytes(8 * _PAD_WORDS), dtype=np.uint64)


def synthesize_kv(prompt: tuple[int, ...], *, block_size: int, bytes_per_token: int) -> bytes:
    """Deterministic stand-in KV bytes; each block depends on its whole prefix, like real attention KV.

    A block is cut from one random pad at an offset its prefix hash picks, XORed with that hash: as cheap as
    a copy (a random generator seeded per block cost more than the rest of a request's path).
    """
    pad, parts = _pad(), []
    for tokens, digest in prefix_hashes(prompt, block_size):
        size = tokens * bytes_per_token
        words = -(-size // 8)
        if words <= len(pad):
            start = digest % (len(pad) - words + 1)
            block = pad[start:start + words]
        else:
            block = np.resize(pad, words)
        parts.append((block ^ np.uint64(digest)).tobytes()[:size])
    return b"".join(parts)


class PrefixCache:
    """Which full prompt blocks this engine still has, newest last; the oldest are forgotten first.

    Like vLLM's, it reuses the KV of blocks that finished requests left behind. Unlike vLLM's, cached
    blocks do not count against the block pool: the cache holds at most `capacity` block hashes.
    """

    def __init__(self, capacity: int, events: KvEventLog) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._events = events

    def hit_blocks(self, hashes: list[int]) -> int:
        """How many leading blocks are cached; they become the most recently used."""
        hits = 0
        for digest in hashes:
            if digest not in self._blocks:
                break
            self._blocks.move_to_end(digest)
            hits += 1
        return hits

    def store(self, hashes: list[int]) -> None:
        for digest in hashes:
            self._blocks[digest] = None
            self._blocks.move_to_end(digest)
        evicted = [self._blocks.popitem(last=False)[0] for _ in range(len(self._blocks) - self.capacity)]
        self._events.stored(hashes)
        self._events.removed(evicted)


class StepCost(Protocol):
    """How long one engine step takes, from what it carries."""

    def step_ms(self, prefill_tokens: int, prefill_context: int, decode_batch: int,
                decode_context_total: int) -> float:
        """`prefill_tokens` new prompt tokens attending to `prefill_context` tokens in all, plus
        `decode_batch` sequences generating one token each over `decode_context_total` cached tokens."""
        ...


@dataclass(frozen=True)
class LinearStepCost:
    """A fixed time for a step with decodes plus a time per prefill token: enough for a small CPU model."""

    prefill_ms_per_token: float
    decode_step_ms: float

    def step_ms(self, prefill_tokens: int, prefill_context: int, decode_batch: int,
                decode_context_total: int) -> float:
        return prefill_tokens * self.prefill_ms_per_token + (self.decode_step_ms if decode_batch else 0.0)


class _Outputs:
    """A request's outputs on their way to its reader. While the reader has not taken one, the next merges
    into it (as vLLM's output collector does): a reader that falls behind takes one output per wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: EngineOutput | None = None
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, out: EngineOutput) -> None:
        if self._pending is None:
            self._pending = out
        else:
            self._pending.extend(out)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self._failure = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> EngineOutput:
        """What was made since the last call; the failure once nothing is left."""
        while self._pending is None and self._failure is None:
            self._waiter = self._loop.create_future()
            await self._waiter
        out, self._pending = self._pending, None
        if out is None:
            assert self._failure is not None
            raise self._failure
        return out


@dataclass(eq=False)
class _Sequence:
    """A request inside the step loop."""

    request: EngineRequest
    prompt: tuple[int, ...]
    blocks: int
    usage: pb.Usage
    outputs: _Outputs
    to_prefill: int = 0
    kv: Any = None
    """The prompt's KV bytes (received, or computed here)."""
    transfer: pb.KvTransferStats | None = None
    tokens: _TokenStream | None = None
    aborted: bool = False
    block_hashes: list[int] = field(default_factory=list)
    """The prompt's full blocks, for the prefix cache."""

    @property
    def context(self) -> int:
        """Tokens whose KV exists (resumed tokens are prefilled after the prompt and count as output)."""
        return len(self.prompt) - self.to_prefill + self.usage.completion_tokens


class SimulatedEngine:
    """The simulated adapter of the Engine protocol.

    Like a real engine it runs in steps: each step carries every running decode plus at most one
    prefill chunk (up to `max_num_batched_tokens` in all), and lasts what the step cost model says for
    that mix, so a long prefill slows the decodes it shares steps with. `time_scale` > 1 runs the
    simulated clock faster than the wall clock.
    """

    kind = "simulated"

    def __init__(self, config: SimulatedEngineConfig, *, kv_store: LeasedKvStore | None = None,
                 kv_receiver: KvReceiver | None = None, cost: StepCost | None = None) -> None:
        self.config = config
        self.model = config.model
        self.fingerprint = (f"simulated-1/{config.model}/bs{config.block_size}/kv{config.kv_bytes_per_token}"
                            f"/L{config.num_layers}/uint8" +
                            (f"/tp{config.tensor_parallel_size}" if config.tensor_parallel_size > 1 else ""))
        self._store = kv_store
        self._receiver = kv_receiver
        self._cost = cost or (load_tensor_parallel_cost(config.cost_model, config.tensor_parallel_size)
                              if config.cost_model else
                              LinearStepCost(config.prefill_s_per_token * 1e3, config.decode_step_s * 1e3))
        self._blocks = BlockPool(config.num_blocks)
        self.kv_events = KvEventLog(config.block_size)
        self._prefix_cache = PrefixCache(config.num_blocks, self.kv_events) if config.prefix_caching else None
        self._prompt_tokens = self._hit_tokens = 0
        self._live: dict[str, _Sequence] = {}
        self._scheduled: list[_Sequence] = []
        self._stepper: asyncio.Task[None] | None = None
        self._finished = 0
        self.steps = 0

    def capacity(self) -> pb.WorkerCapacity:
        return pb.WorkerCapacity(kv_blocks=self.config.num_blocks, block_size=self.config.block_size,
                                 max_batch_size=self.config.max_batch_size)

    def layout(self, num_tokens: int) -> pb.KvLayout:
        return pb.KvLayout(block_size=self.config.block_size, num_blocks=math.ceil(num_tokens / self.config.block_size),
                           bytes_per_token=self.config.kv_bytes_per_token, num_layers=self.config.num_layers,
                           dtype="uint8")

    def tokenize(self, prompt: str | tuple[int, ...]) -> tuple[int, ...]:
        return tokenize(prompt)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        rid = request.request_id
        if isinstance(request.prompt, str):  # a token per UTF-8 byte: at most one character a token
            check_text_length(request.prompt, max_chars_per_token=1, max_model_len=self.config.max_model_len,
                              request_id=rid)
        prompt = self.tokenize(request.prompt)
        request, blocks = self._admit(rid, prompt, request)
        seq = _Sequence(request, prompt, blocks,
                        pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(request.resume)),
                        _Outputs(asyncio.get_running_loop()), to_prefill=len(prompt) + len(request.resume))
        self._live[rid] = seq
        needed, seq.blocks = seq.blocks, 0
        caching = self._prefix_cache is not None
        seq.block_hashes = hashes = block_hashes(prompt, self.config.block_size) if caching else []
        try:
            await self._blocks.acquire(needed)
            seq.blocks = needed
            if request.kv_handle is not None:
                # The prompt's KV comes from a prefill worker; the last prompt token is recomputed.
                # Not prefix-cache hits: cached_tokens stays 0 (the decode servicer reports the transfer).
                kv = await self._receiver.receive(request.kv_handle, prompt=prompt,
                                                  fingerprint=self.fingerprint, request_id=rid,
                                                  max_bytes=layout_bytes(self.layout(len(prompt))),
                                                  order=request.kv_transports)
                seq.kv, seq.transfer = kv.data, kv.stats
                seq.to_prefill = 1
            elif self._prefix_cache is not None:
                # Cached leading blocks need no compute; the last prompt token is always computed.
                cached = min(self._prefix_cache.hit_blocks(hashes)
                             * self.config.block_size, len(prompt) - 1)
                seq.to_prefill -= cached
                seq.usage.cached_tokens = cached
                self._prompt_tokens += len(prompt)
                self._hit_tokens += cached
            if seq.aborted:
                yield EngineOutput(finish_reason=FinishReason.CANCELLED, usage=seq.usage)
                return
            self._schedule(seq)
            while True:
                out = await seq.outputs.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self._live.pop(rid, None)
            if seq in self._scheduled:
                self._scheduled.remove(seq)
            self._finished += 1
            if seq.blocks:
                self._blocks.release(seq.blocks)

    async def abort(self, request_id: str) -> None:
        seq = self._live.get(request_id)
        if seq is not None:
            seq.aborted = True

    def stats(self) -> pb.WorkerStats:
        stats = pb.WorkerStats(active_requests=len(self._live), used_kv_blocks=self._blocks.total - self._blocks.free,
                               total_kv_blocks=self._blocks.total, requests_finished=self._finished,
                               prompt_tokens=self._prompt_tokens, prefix_cache_hit_tokens=self._hit_tokens)
        if self._store is not None:
            self._store.add_stats(stats)
        if self._receiver is not None:
            self._receiver.add_stats(stats)
        return stats

    async def shutdown(self) -> None:
        for seq in self._live.values():
            seq.aborted = True

    def _schedule(self, seq: _Sequence) -> None:
        self._scheduled.append(seq)
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._run_steps())

    async def _run_steps(self) -> None:
        """The engine loop: plan a step, let its time pass, hand out what it produced."""
        while self._scheduled:
            for seq in [s for s in self._scheduled if s.aborted]:
                self._finish(seq, EngineOutput(finish_reason=FinishReason.CANCELLED, usage=seq.usage,
                                               kv_transfer=seq.transfer))
            decodes = [s for s in self._scheduled if s.to_prefill == 0]
            budget = self.config.max_num_batched_tokens - len(decodes)
            prefill = next((s for s in self._scheduled if s.to_prefill > 0), None) if budget > 0 else None
            chunk = min(prefill.to_prefill, budget) if prefill else 0
            if not decodes and not chunk:
                return
            ms = self._cost.step_ms(chunk, prefill.context + chunk if prefill else 0, len(decodes),
                                    sum(s.context for s in decodes))
            await asyncio.sleep(ms / 1e3 / self.config.time_scale)
            self.steps += 1
            try:
                for seq in decodes:
                    if seq in self._scheduled and not seq.aborted:
                        self._emit_token(seq)
                if prefill is not None and prefill in self._scheduled and not prefill.aborted:
                    prefill.to_prefill -= chunk
                    if prefill.to_prefill == 0:
                        self._prefilled(prefill)
            except Exception as error:  # a bug here must fail the requests, not hang them
                for seq in list(self._scheduled):
                    self._scheduled.remove(seq)
                    seq.outputs.fail(error)
                raise

    def _prefilled(self, seq: _Sequence) -> None:
        """The prompt's KV exists now: the prefix cache can serve its blocks at once (as vLLM's does), a prefill
        request hands it to the store, others sample their first token."""
        if self._prefix_cache is not None:
            self._prefix_cache.store(seq.block_hashes)
        if seq.kv is None:
            seq.kv = synthesize_kv(seq.prompt, block_size=self.config.block_size,
                                   bytes_per_token=self.config.kv_bytes_per_token)
        seq.tokens = _TokenStream(seq.kv, seq.request)
        for _ in seq.request.resume:  # the same choices as the worker that started it made
            seq.tokens.next()
        if not seq.request.produce_kv:
            self._emit_token(seq)
            return
        first = seq.tokens.next()
        handle = self._hold(seq.kv, seq.prompt, seq.blocks)
        seq.blocks = 0
        seq.usage.completion_tokens = 1
        out = EngineOutput([first], _text([first]), FinishReason.LENGTH, seq.usage, kv_handle=handle)
        self._finish(seq, self._with_logprobs(seq, out))

    def _emit_token(self, seq: _Sequence) -> None:
        assert seq.tokens is not None
        token = seq.tokens.next()
        seq.usage.completion_tokens += 1
        finish = seq.tokens.stop_reason(token, seq.usage.completion_tokens)
        out = self._with_logprobs(seq, EngineOutput([token], _text([token]), finish))
        if finish is None:
            seq.outputs.put(out)
            return
        out.usage, out.kv_transfer = seq.usage, seq.transfer
        self._finish(seq, out)

    @staticmethod
    def _with_logprobs(seq: _Sequence, out: EngineOutput) -> EngineOutput:
        top = seq.request.sampling.logprobs
        if top is not None:
            assert seq.tokens is not None
            out.logprobs = [seq.tokens.logprobs(out.token_ids[0], top)]
        return out

    def _finish(self, seq: _Sequence, out: EngineOutput) -> None:
        self._scheduled.remove(seq)
        seq.outputs.put(out)

    def _admit(self, rid: str, prompt: tuple[int, ...], request: EngineRequest) -> tuple[EngineRequest, int]:
        """Check a request before it takes resources; return it with max_tokens clamped to the context left,
        and the KV blocks it needs."""
        if rid in self._live:
            raise AlreadyExists(f"request id {rid!r} is already running on this worker; use a fresh id",
                                request_id=rid)
        if not prompt:
            raise InvalidArgument("prompt is empty", request_id=rid, reason="EMPTY_PROMPT")
        check_prompt(prompt, vocab_size=VOCAB_SIZE, max_model_len=self.config.max_model_len, request_id=rid)
        check_stop_token_ids(request.sampling, vocab_size=VOCAB_SIZE, request_id=rid)
        request = within_context(request, len(prompt), self.config.max_model_len)
        check_kv_roles(request, holds_kv=self._store is not None, pulls_kv=self._receiver is not None)
        total = len(prompt) + (1 if request.produce_kv else request.sampling.max_tokens)
        blocks = math.ceil(total / self.config.block_size)
        if blocks > self._blocks.total:
            raise ResourceExhausted(
                f"request needs {blocks} KV blocks, the engine has {self._blocks.total}; "
                "shorten the prompt or lower max_tokens", request_id=rid, reason="KV_CACHE_TOO_SMALL")
        if len(self._live) >= self.config.max_batch_size:
            raise ResourceExhausted(f"worker is running its maximum of {self.config.max_batch_size} requests; "
                                    "retry later", request_id=rid, reason="WORKER_BUSY")
        return request, blocks

    def _hold(self, kv: bytes, prompt: tuple[int, ...], blocks: int) -> pb.KvHandle:
        assert self._store is not None
        return self._store.hold(data=kv, num_tokens=len(prompt), layout=self.layout(len(prompt)),
                                fingerprint=self.fingerprint, on_free=lambda: self._blocks.release(blocks),
                                prompt=prompt)


class _TokenStream:
    """Next-token choice: a hash chain seeded by the KV bytes, perturbed by the sampling seed."""

    def __init__(self, kv: bytes, request: EngineRequest) -> None:
        self._state = zlib.crc32(kv)
        self._sampling = request.sampling
        greedy = request.sampling.temperature == 0
        self._rng = None if greedy else random.Random(request.sampling.seed)

    def next(self) -> int:
        noise = self._rng.getrandbits(64) if self._rng else 0
        self._state = (self._state * 6364136223846793005 + 1442695040888963407) & _MASK64
        return _pick((self._state ^ noise) >> 33)

    def logprobs(self, token: int, top: int) -> pb.TokenLogprob:
        """Synthetic log probabilities at the position `next` just chose `token` for: a geometric
        distribution over the tokens this model makes, ranked by the position's state, with the greedy
        choice first. Deterministic, at most 0, and the sampled token always has one."""
        greedy = _pick(self._state >> 33)
        state = self._state
        ranked = sorted(_CANDIDATES, key=lambda t: (t != greedy, (state ^ t * _GOLDEN) * _MIX & _MASK64))
        ratio = 0.2 + 0.6 * (state >> 11 & 0xFFFF) / 0xFFFF  # each rank this much less likely
        head, step = math.log1p(-ratio), math.log(ratio)

        def logprob(rank: int) -> float:
            return head + rank * step

        return pb.TokenLogprob(logprob=logprob(ranked.index(token)), token=_text([token]), top_logprobs=[
            pb.TopLogprob(token_id=t, token=_text([t]), logprob=logprob(rank))
            for rank, t in enumerate(ranked[:top])])

    def stop_reason(self, token: int, produced: int) -> FinishReason | None:
        if (token == EOS_TOKEN_ID and not self._sampling.ignore_eos) or token in self._sampling.stop_token_ids:
            return FinishReason.STOP
        if produced >= self._sampling.max_tokens:
            return FinishReason.LENGTH
        return None


def _pick(mixed: int) -> int:
    if mixed % 509 == 0:
        return EOS_TOKEN_ID
    return _ALPHABET[mixed % len(_ALPHABET)]


def _text(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
