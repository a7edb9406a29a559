"""The engine contract: one small Protocol that the vLLM and simulated adapters both implement.

Servicers speak only to this Protocol, so a worker role never knows which engine runs behind it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dynamo_grpc.errors import FailedPrecondition, InvalidArgument
from dynamo_grpc.kv.events import KvEventLog
from dynamo_grpc.v1 import common_pb2 as pb


class FinishReason(enum.IntEnum):
    """Why a generation ended; values match `dynamo_grpc.v1.FinishReason`."""

    STOP = pb.FINISH_REASON_STOP
    LENGTH = pb.FINISH_REASON_LENGTH
    CANCELLED = pb.FINISH_REASON_CANCELLED


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters (see `SamplingParams` in common.proto for the defaults)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return each token's log probability with this many top alternatives; None returns none."""
    stop: tuple[str, ...] = ()
    """Stop strings; matched by the decode worker on the engine's text (`stop_strings`), not by engines."""


@dataclass(frozen=True)
class EngineRequest:
    """One generation. `produce_kv` asks a prefill engine to hold the prompt's KV for pulling;
    `kv_handle` asks a decode engine to pull the prompt's KV instead of computing it; `resume`
    continues a generation that another worker started (migration)."""

    request_id: str
    prompt: str | tuple[int, ...]
    sampling: Sampling
    produce_kv: bool = False
    kv_handle: pb.KvHandle | None = None
    resume: tuple[int, ...] = ()
    """Tokens already generated elsewhere: they extend the prompt, count as output, and are not sent again."""
    kv_transports: tuple[int, ...] = ()
    """`KvTransport`s to take `kv_handle` by, in order; empty: every one the worker has, in its own order."""


@dataclass
class EngineOutput:
    """New tokens of one step; the last output of a request carries `finish_reason` and `usage`."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: pb.Usage | None = None
    kv_handle: pb.KvHandle | None = None
    kv_transfer: pb.KvTransferStats | None = None
    logprobs: list[pb.TokenLogprob] | None = None
    """One per token id, when the request asked for logprobs."""

    def prepend(self, earlier: EngineOutput) -> None:
        """Put `earlier`'s tokens before this output's, merging two consecutive outputs into this one."""
        self.token_ids = earlier.token_ids + self.token_ids
        self.text = earlier.text + self.text
        if earlier.logprobs:
            self.logprobs = earlier.logprobs + (self.logprobs or [])

    def extend(self, later: EngineOutput) -> None:
        """Put `later`'s tokens after this output's and take its other fields, merging two consecutive
        outputs into this one (in place: an output owns its lists)."""
        self.token_ids.extend(later.token_ids)
        self.text += later.text
        if later.logprobs:
            self.logprobs = [*(self.logprobs or ()), *later.logprobs]
        self.finish_reason, self.usage = later.finish_reason, later.usage
        self.kv_handle, self.kv_transfer = later.kv_handle, later.kv_transfer


def check_kv_roles(request: EngineRequest, *, holds_kv: bool, pulls_kv: bool) -> None:
    """Refuse a KV mode this worker was not built for: prefill needs a KV store, decode-with-handle a puller."""
    if request.produce_kv and not holds_kv:
        raise FailedPrecondition("this worker holds no KV store; it cannot serve prefill requests",
                                 request_id=request.request_id, reason="NOT_A_PREFILL_WORKER")
    if request.kv_handle is not None and not pulls_kv:
        raise FailedPrecondition("this worker cannot pull KV", request_id=request.request_id,
                                 reason="NOT_A_DECODE_WORKER")


def check_prompt(prompt: Sequence[int], *, vocab_size: int, max_model_len: int, request_id: str) -> None:
    """Refuse token ids outside the vocabulary, and prompts that leave no room for one generated token."""
    if prompt and (min(prompt) < 0 or max(prompt) >= vocab_size):
        bad = next(t for t in prompt if not 0 <= t < vocab_size)
        raise InvalidArgument(f"prompt token id {bad} is outside the model's vocabulary of {vocab_size} tokens "
                              f"(ids 0 to {vocab_size - 1})", request_id=request_id, reason="TOKEN_OUT_OF_VOCABULARY")
    if len(prompt) >= max_model_len:
        raise InvalidArgument(f"the prompt has {len(prompt)} tokens and the model's context is {max_model_len}; a "
                              f"prompt must leave room for at least one generated token, so shorten it to "
                              f"{max_model_len - 1} tokens or fewer", request_id=request_id, reason="CONTEXT_TOO_LONG")


def check_text_length(text: str, *, max_chars_per_token: int, max_model_len: int, request_id: str) -> None:
    """Refuse text that holds at least a context's worth of tokens by its length alone, before tokenizing it
    (a prompt of megabytes would take the worker's memory and time first)."""
    if len(text) >= max_model_len * max_chars_per_token:
        raise InvalidArgument(f"the prompt has {len(text)} characters, so at least "
                              f"{len(text) // max_chars_per_token} tokens, and the model's context is "
                              f"{max_model_len}; a prompt must leave room for at least one generated token, so "
                              "shorten it", request_id=request_id, reason="CONTEXT_TOO_LONG")


def check_stop_token_ids(sampling: Sampling, *, vocab_size: int, request_id: str) -> None:
    bad = [t for t in sampling.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(f"sampling.stop_token_ids must be token ids of the model's vocabulary (0 to "
                              f"{vocab_size - 1}), got {bad}", request_id=request_id, reason="BAD_SAMPLING_PARAMS")


def within_context(request: EngineRequest, prompt_tokens: int, max_model_len: int) -> EngineRequest:
    """The request with max_tokens clamped to the context the prompt leaves, as vLLM's OpenAI server does: a
    generation that reaches the end of the context finishes with LENGTH instead of being refused."""
    room = max_model_len - prompt_tokens
    if request.sampling.max_tokens <= room:
        return request
    return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=room))


class Engine(Protocol):
    """What a worker needs from an inference engine."""

    model: str
    fingerprint: str
    kind: str
    kv_events: KvEventLog | None
    """The blocks its prefix cache holds and their changes; None when the engine does not report them."""

    def capacity(self) -> pb.WorkerCapacity: ...

    def layout(self, num_tokens: int) -> pb.KvLayout:
        """How the KV of `num_tokens` prompt tokens is laid out in a transfer."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream outputs until the request finishes; closing the iterator aborts it."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a running request: its stream ends with FinishReason.CANCELLED. Unknown ids are ignored."""
        ...

    def stats(self) -> pb.WorkerStats: ...

    async def shutdown(self) -> None: ...
