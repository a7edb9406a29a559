"""A simulated engine: the Engine protocol with timings from a cost model instead of a GPU.

It is faithful where the rest of the system can tell: tokens are a deterministic function of the
prompt's KV bytes (so KV that arrives corrupted or for the wrong prompt changes the output), the KV
cache is paged and bounded, a prefill's blocks stay allocated until its transfer is released or
expires, and abort frees everything. Tokens are bytes; generated ones are printable letters.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.engine.base import EngineOutput, EngineRequest, FinishReason
from dynamo_grpc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from dynamo_grpc.kv_client import KvPuller
from dynamo_grpc.kv_store import LeasedKvStore
from dynamo_grpc.v1 import common_pb2 as pb

VOCAB_SIZE = 257
EOS_TOKEN_ID = 256
_ALPHABET = b" abcdefghijklmnopqrstuvwxyz"
_MASK64 = (1 << 64) - 1


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

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "kv_bytes_per_token", "num_layers", "max_batch_size",
                     "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"simulated engine: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("prefill_s_per_token", "decode_step_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"simulated engine: {name} must not be negative, got {getattr(self, name)}")


class BlockPool:
    """Counts free KV blocks; requests wait for room instead of failing while others finish."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._room = asyncio.Condition()

    async def acquire(self, count: int) -> None:
        async with self._room:
            await self._room.wait_for(lambda: self.free >= count)
            self.free -= count

    def release(self, count: int) -> None:
        self.free += count
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._room:
            self._room.notify_all()


def synthesize_kv(prompt: tuple[int, ...], *, block_size: int, bytes_per_token: int) -> bytes:
    """Deterministic stand-in KV bytes; each block depends on its whole prefix, like real attention KV."""
    parts = []
    prefix = hashlib.blake2b(digest_size=8)
    for start in range(0, len(prompt), block_size):
        block = prompt[start:start + block_size]
        prefix.update(np.asarray(block, dtype=np.uint32).tobytes())
        seed = int.from_bytes(prefix.digest(), "little")
        parts.append(np.random.default_rng(seed).bytes(len(block) * bytes_per_token))
    return b"".join(parts)


class SimulatedEngine:
    """The simulated adapter of the Engine protocol."""

    kind = "simulated"

    def __init__(self, config: SimulatedEngineConfig, *, kv_store: LeasedKvStore | None = None,
                 kv_channels: ChannelPool | None = None) -> None:
        self.config = config
        self.model = config.model
        self.fingerprint = (f"simulated-1/{config.model}/bs{config.block_size}/kv{config.kv_bytes_per_token}"
                            f"/L{config.num_layers}/uint8")
        self._store = kv_store
        self._puller = KvPuller(kv_channels, fingerprint=self.fingerprint) if kv_channels else None
        self._blocks = BlockPool(config.num_blocks)
        self._live: dict[str, asyncio.Event] = {}
        self._finished = 0

    def capacity(self) -> pb.WorkerCapacity:
        return pb.WorkerCapacity(kv_blocks=self.config.num_blocks, block_size=self.config.block_size,
                                 max_batch_size=self.config.max_batch_size)

    def layout(self, num_tokens: int) -> pb.KvLayout:
        return pb.KvLayout(block_size=self.config.block_size, num_blocks=math.ceil(num_tokens / self.config.block_size),
                           bytes_per_token=self.config.kv_bytes_per_token, num_layers=self.config.num_layers,
                           dtype="uint8")

    def tokenize(self, prompt: str | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(prompt.encode()) if isinstance(prompt, str) else prompt

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        rid = request.request_id
        prompt = self.tokenize(request.prompt)
        max_tokens = 1 if request.produce_kv else request.sampling.max_tokens
        blocks = self._admit(rid, prompt, max_tokens, request)
        aborted = self._live[rid] = asyncio.Event()
        owned = 0
        try:
            await self._blocks.acquire(blocks)
            owned = blocks
            # 1) The prompt's KV: pulled from a prefill worker, or computed here.
            transfer = None
            if request.kv_handle is not None:
                kv, transfer = await self._pull(request.kv_handle, rid, len(prompt))
            else:
                await asyncio.sleep(len(prompt) * self.config.prefill_s_per_token)
                kv = synthesize_kv(prompt, block_size=self.config.block_size,
                                   bytes_per_token=self.config.kv_bytes_per_token)
            usage = pb.Usage(prompt_tokens=len(prompt), cached_tokens=len(prompt) if transfer else 0)
            tokens = _TokenStream(kv, request)
            # 2) Prefill role: sample one token, hand the blocks to the KV store until pulled.
            if request.produce_kv:
                if aborted.is_set():
                    yield EngineOutput(finish_reason=FinishReason.CANCELLED, usage=usage)
                    return
                first = tokens.next()
                handle = self._hold(kv, len(prompt), owned)
                owned = 0
                usage.completion_tokens = 1
                yield EngineOutput([first], _text([first]), FinishReason.LENGTH, usage, kv_handle=handle)
                return
            # 3) Decode loop, one token per step.
            for _ in range(max_tokens):
                await asyncio.sleep(self.config.decode_step_s)
                if aborted.is_set():
                    yield EngineOutput(finish_reason=FinishReason.CANCELLED, usage=usage, kv_transfer=transfer)
                    return
                token = tokens.next()
                usage.completion_tokens += 1
                finish = tokens.stop_reason(token, usage.completion_tokens)
                out = EngineOutput([token], _text([token]), finish)
                if finish is not None:
                    out.usage, out.kv_transfer = usage, transfer
                    yield out
                    return
                yield out
        finally:
            self._live.pop(rid, None)
            self._finished += 1
            if owned:
                self._blocks.release(owned)

    async def abort(self, request_id: str) -> None:
        event = self._live.get(request_id)
        if event is not None:
            event.set()

    def stats(self) -> pb.WorkerStats:
        stats = pb.WorkerStats(active_requests=len(self._live), used_kv_blocks=self._blocks.total - self._blocks.free,
                               total_kv_blocks=self._blocks.total, requests_finished=self._finished)
        if self._store is not None:
            self._store.add_stats(stats)
        return stats

    async def shutdown(self) -> None:
        for event in self._live.values():
            event.set()

    def _admit(self, rid: str, prompt: tuple[int, ...], max_tokens: int, request: EngineRequest) -> int:
        """Check a request before it takes resources; return the KV blocks it needs."""
        if rid in self._live:
            raise AlreadyExists(f"request id {rid!r} is already running on this worker; use a fresh id",
                                request_id=rid)
        if not prompt:
            raise InvalidArgument("prompt is empty", request_id=rid, reason="EMPTY_PROMPT")
        bad = next((t for t in prompt if not 0 <= t < VOCAB_SIZE), None)
        if bad is not None:
            raise InvalidArgument(f"prompt token id {bad} is outside the vocabulary [0, {VOCAB_SIZE})",
                                  request_id=rid, reason="TOKEN_OUT_OF_VOCABULARY")
        total = len(prompt) + max_tokens
        if total > self.config.max_model_len:
            raise InvalidArgument(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
                f"of {self.config.max_model_len} tokens; shorten the prompt or lower max_tokens",
                request_id=rid, reason="CONTEXT_TOO_LONG")
        if request.produce_kv and self._store is None:
            raise FailedPrecondition("this worker holds no KV store; it cannot serve prefill requests",
                                     request_id=rid, reason="NOT_A_PREFILL_WORKER")
        if request.kv_handle is not None and self._puller is None:
            raise FailedPrecondition("this worker cannot pull KV", request_id=rid, reason="NOT_A_DECODE_WORKER")
        blocks = math.ceil(total / self.config.block_size)
        if blocks > self._blocks.total:
            raise ResourceExhausted(
                f"request needs {blocks} KV blocks, the engine has {self._blocks.total}; "
                "shorten the prompt or lower max_tokens", request_id=rid, reason="KV_CACHE_TOO_SMALL")
        if len(self._live) >= self.config.max_batch_size:
            raise ResourceExhausted(f"worker is running its maximum of {self.config.max_batch_size} requests; "
                                    "retry later", request_id=rid, reason="WORKER_BUSY")
        return blocks

    async def _pull(self, handle: pb.KvHandle, rid: str, prompt_tokens: int
                    ) -> tuple[bytearray, pb.KvTransferStats]:
        if handle.num_tokens != prompt_tokens:
            raise FailedPrecondition(
                f"KV handle covers {handle.num_tokens} tokens but the prompt has {prompt_tokens}; "
                "send the same prompt that was prefilled", request_id=rid, reason="KV_HANDLE_PROMPT_MISMATCH")
        assert self._puller is not None
        kv, transfer = await self._puller.pull(handle, request_id=rid)
        await self._puller.release(handle, request_id=rid)
        return kv, transfer

    def _hold(self, kv: bytes, num_tokens: int, blocks: int) -> pb.KvHandle:
        assert self._store is not None
        return self._store.hold(data=kv, num_tokens=num_tokens, layout=self.layout(num_tokens),
                                fingerprint=self.fingerprint, on_free=lambda: self._blocks.release(blocks))


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
        mixed = (self._state ^ noise) >> 33
        if mixed % 509 == 0:
            return EOS_TOKEN_ID
        return _ALPHABET[mixed % len(_ALPHABET)]

    def stop_reason(self, token: int, produced: int) -> FinishReason | None:
        if (token == EOS_TOKEN_ID and not self._sampling.ignore_eos) or token in self._sampling.stop_token_ids:
            return FinishReason.STOP
        if produced >= self._sampling.max_tokens:
            return FinishReason.LENGTH
        return None


def _text(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
