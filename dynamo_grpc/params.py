"""Checks and converts the request messages shared by every service (GenerationParams, SamplingParams).

Every check fails with INVALID_ARGUMENT and a message that names the field and the allowed range.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator

from dynamo_grpc.engine.base import Sampling
from dynamo_grpc.errors import DeadlineExceeded, InvalidArgument
from dynamo_grpc.v1 import common_pb2 as pb

MAX_TEMPERATURE = 2.0
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; vLLM's `max_logprobs` engine default is the same
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256


def prompt_of(params: pb.GenerationParams, request_id: str) -> str | tuple[int, ...]:
    """The prompt as text or token ids; empty prompts are refused."""
    form = params.prompt.WhichOneof("form")
    prompt: str | tuple[int, ...]
    if form == "text":
        prompt = params.prompt.text
    elif form == "token_ids":
        prompt = tuple(params.prompt.token_ids.ids)
    else:
        prompt = ""
    if not prompt:
        raise InvalidArgument("prompt is empty: set prompt.text or prompt.token_ids", request_id=request_id,
                              reason="EMPTY_PROMPT")
    return prompt


def estimated_tokens(params: pb.GenerationParams) -> int:
    """Prompt length in tokens: exact for token ids; for text, about four UTF-8 bytes a token."""
    if params.prompt.WhichOneof("form") == "token_ids":
        return len(params.prompt.token_ids.ids)
    return -(-len(params.prompt.text.encode()) // 4)


_DEFAULTS = Sampling()


def sampling_of(params: pb.GenerationParams, request_id: str) -> Sampling:
    """Validated sampling parameters with the documented defaults filled in."""
    s = params.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else _DEFAULTS.max_tokens
    temperature = s.temperature if s.HasField("temperature") else _DEFAULTS.temperature
    top_p = s.top_p if s.HasField("top_p") else _DEFAULTS.top_p
    logprobs = s.logprobs if s.HasField("logprobs") else None
    stop = tuple(s.stop) if s.stop else ()
    if max_tokens < 1:
        raise _bad_sampling("max_tokens", "at least 1", max_tokens, request_id)
    if not (0.0 <= temperature <= MAX_TEMPERATURE):
        raise _bad_sampling("temperature", f"in [0, {MAX_TEMPERATURE}]", temperature, request_id)
    if math.isnan(top_p) or not (0.0 < top_p <= 1.0):
        raise _bad_sampling("top_p", "in (0, 1]", top_p, request_id)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise _bad_sampling("logprobs", f"at most {MAX_LOGPROBS}", logprobs, request_id)
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad_sampling("stop", f"at most {MAX_STOP_STRINGS} strings", len(stop), request_id)
    if any(not 0 < len(one) <= MAX_STOP_LENGTH for one in stop):
        lengths = [len(one) for one in stop]
        raise _bad_sampling("stop", f"strings of 1 to {MAX_STOP_LENGTH} characters", f"lengths {lengths}", request_id)
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=s.top_k,
                    seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids) if s.stop_token_ids else (),
                    ignore_eos=s.ignore_eos, logprobs=logprobs, stop=stop)


def _bad_sampling(field: str, allowed: str, value: object, request_id: str) -> InvalidArgument:
    return InvalidArgument(f"sampling.{field} must be {allowed}, got {value}", request_id=request_id,
                           reason="BAD_SAMPLING_PARAMS")


# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS = -62_135_596_800, 253_402_300_799
MAX_REQUEST_ID_CHARS = 256  # ids travel in every status's ErrorInfo, which must fit gRPC's metadata limit


def valid_request_id(request_id: str, limit: int = MAX_REQUEST_ID_CHARS) -> bool:
    return len(request_id) <= limit and request_id.isascii() and request_id.isprintable()


def check_request_id(request_id: str) -> None:
    if not request_id:
        raise InvalidArgument("request_id is empty; every request needs an id unique among live requests",
                              reason="MISSING_REQUEST_ID")
    check_request_id_form(request_id)


def check_request_id_form(request_id: str) -> None:
    """Refuse ids a status could not carry back (the ErrorInfo names the request); not echoed here either."""
    if not valid_request_id(request_id):
        raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters, "
                              f"got {len(request_id)} characters; send a shorter id", reason="BAD_REQUEST_ID")


def seconds_left(params: pb.GenerationParams, request_id: str) -> float | None:
    """Time until the request's deadline, or None without one; a past deadline fails at once."""
    if not params.HasField("deadline"):
        return None
    deadline = params.deadline
    if not (MIN_TIMESTAMP_SECONDS <= deadline.seconds <= MAX_TIMESTAMP_SECONDS and 0 <= deadline.nanos < 10**9):
        raise InvalidArgument(f"deadline must be a Timestamp from year 1 to 9999 with nanos in [0, 999999999], "
                              f"got seconds={deadline.seconds} nanos={deadline.nanos}", request_id=request_id,
                              reason="BAD_DEADLINE")
    left = deadline.ToNanoseconds() / 1e9 - time.time()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline has already passed", request_id=request_id)
    return left


@contextlib.contextmanager
def deadline_timer(timeout: float | None, on_expire: Callable[[], None]) -> Iterator[asyncio.Event]:
    """Run `on_expire` when `timeout` runs out inside the block; the event tells whether it did.

    Deadlines stop a request through its own abort path rather than by cancelling the handler task: a
    cancellation lands wherever the task waits, often inside gRPC's write of a response, where it
    cannot become a status and the client waits forever.
    """
    expired = asyncio.Event()

    def fire() -> None:
        expired.set()
        on_expire()

    timer = asyncio.get_running_loop().call_later(timeout, fire) if timeout is not None else None
    try:
        yield expired
    finally:
        if timer is not None:
            timer.cancel()
