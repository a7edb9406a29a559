"""OpenAI request checking and response shapes, kept apart from HTTP so each rule is easy to find.

A request becomes `GenerationParams` for RouterService.Generate; every refusal names the offending
field, so a client sees what to fix without reading our logs.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dynamo_grpc.v1 import common_pb2 as pb

UINT32 = 2**32
UINT64 = 2**64
MAX_N = 8  # choices per request: each is a generation of its own
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs`, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions `logprobs`, as OpenAI
LOWEST_LOGPROB = -9999.0  # stands for -inf, which JSON cannot carry (vLLM's server does the same)

# OpenAI parameters this server does not implement, and the values of each that ask for nothing (accepted).
NOT_IMPLEMENTED = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
                   "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
                   "response_format": ({"type": "text"},)}

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,  # a live request already has this X-Request-Id: the client's to fix
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,  # WORKER_BUSY: retry later
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Reasons whose code says too little: a request that can never fit is not "busy", retrying will not help.
REASON_HTTP_STATUS = {"KV_CACHE_TOO_SMALL": 400, "MESSAGE_TOO_LARGE": 413}

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               408: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error", 504: "timeout_error"}


class BadRequest(Exception):
    """A request we refuse before it reaches the router; `param` is the field to fix."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def http_status(code: grpc.StatusCode, reason: str) -> int:
    return REASON_HTTP_STATUS.get(reason) or HTTP_STATUS.get(code, 500)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


@dataclass
class Job:
    """One checked request: what to ask the router, and how the client wants the answer."""

    chat: bool
    model: str
    params: pb.GenerationParams
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    n: int = 1
    logprobs: int | None = None
    """Alternatives per token when the client asked for logprobs; None when it did not."""
    echo: str = ""
    """The prompt, when a completion should start with it (`echo`)."""
    created: int = field(default_factory=lambda: int(time.time()))

    def choice_params(self, index: int) -> pb.GenerationParams:
        """The generation of choice `index`: with a seed, choice i samples with seed + i (mod 2**64), so
        choices differ, each is reproducible, and choice 0 is what the same request with n=1 gives."""
        if not index or not self.params.sampling.HasField("seed"):
            return self.params
        params = pb.GenerationParams()
        params.CopyFrom(self.params)
        params.sampling.seed = (params.sampling.seed + index) % UINT64
        return params


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise BadRequest(f"`{name}` must be an integer in [{low}, {high - 1}], got {value!r}", name)
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"`{name}` must be a number, got {value!r}", name)
    try:
        return float(value)
    except OverflowError:
        raise BadRequest(f"`{name}` must be a number within a double's range", name) from None


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be true or false, got {value!r}", name)
    return value


def _token_ids(value: object, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < UINT32 for t in value):
        raise BadRequest(f"`{name}` must be a list of non-negative integer token ids", name)
    return value


def _completion_prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("`prompt` is empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise BadRequest("`prompt` may hold one prompt only; send one request per prompt", "prompt")
    if isinstance(prompt, list) and prompt:
        return _token_ids(prompt, "prompt")
    raise BadRequest("`prompt` is required: a string or a non-empty list of token ids", "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Messages with their content flattened to text (content parts other than text are refused)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` is required: a non-empty list of {role, content} objects", "messages")
    flat = []
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"`{name}` must be an object with a string `role`", name)
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise BadRequest(f"`{name}.content` parts must all be {{type: text, text}}", f"{name}.content")
            content = "".join(part["text"] for part in content)
        elif not isinstance(content, str):
            raise BadRequest(f"`{name}.content` must be a string or a list of text parts", f"{name}.content")
        flat.append({"role": message["role"], "content": content})
    return flat


def chat_prompt(messages: list[dict[str, str]], chat_template: str | None) -> str:
    """The prompt text of a conversation, ending where the assistant's answer starts."""
    if chat_template is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        # The engine's tokenizer adds the BOS token itself; rendering it here would double it.
        return env.from_string(chat_template).render(messages=messages, add_generation_prompt=True,
                                                     bos_token="", eos_token="")
    except TemplateError as error:
        raise BadRequest(f"the model's chat template refused these messages: {error}", "messages") from None


def load_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a tokenizer directory ships (chat_template.jinja or tokenizer_config.json)."""
    directory = Path(model_dir)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def parse_job(body: object, *, chat: bool, chat_template: str | None) -> Job:
    """Check an OpenAI request body and turn it into router parameters."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required: the name of a served model (GET /v1/models lists them)", "model")
    n = _int(body, "n", 1, MAX_N + 1) or 1
    _refuse_not_implemented(body, n)
    prompt = chat_prompt(_messages(body), chat_template) if chat else _completion_prompt(body)
    form = pb.Prompt(text=prompt) if isinstance(prompt, str) else pb.Prompt(token_ids=pb.TokenIds(ids=prompt))

    sampling = pb.SamplingParams(ignore_eos=_flag(body, "ignore_eos"), stop=_stop_strings(body),
                                 top_k=_int(body, "top_k", 0, UINT32) or 0)
    max_tokens = _int(body, "max_completion_tokens", 1, UINT32) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, UINT32)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            setattr(sampling, name, value)
    seed = _int(body, "seed", 0, UINT64)
    if seed is not None:
        sampling.seed = seed
    if body.get("stop_token_ids") is not None:
        sampling.stop_token_ids.extend(_token_ids(body["stop_token_ids"], "stop_token_ids"))
    logprobs = _chat_logprobs(body) if chat else _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS + 1)
    if logprobs is not None:
        sampling.logprobs = logprobs
    echo = False if chat else _flag(body, "echo")
    if echo and not isinstance(prompt, str):
        raise BadRequest("`echo` needs a text prompt: this server does not turn token ids back into text",
                         "echo")
    if echo and logprobs is not None:
        raise BadRequest("`echo` with `logprobs` needs the prompt's log probabilities, which this server "
                         "does not compute; drop one of the two", "echo")

    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise BadRequest("`stream_options` must be an object, and only goes with `stream: true`", "stream_options")
    include_usage = _flag(options or {}, "include_usage")
    return Job(chat=chat, model=model, params=pb.GenerationParams(model=model, prompt=form, sampling=sampling),
               stream=stream, include_usage=include_usage, return_token_ids=_flag(body, "return_token_ids"),
               n=n, logprobs=logprobs, echo=prompt if echo else "")


def _refuse_not_implemented(body: dict[str, Any], n: int) -> None:
    """A parameter we would otherwise ignore is refused, unless its value asks for nothing."""
    for name, neutral in (*NOT_IMPLEMENTED.items(), ("best_of", (1, n))):
        value = body.get(name)
        if value is not None and value not in neutral:
            raise BadRequest(f"`{name}` is not supported by this server; leave it out", name)


def _stop_strings(body: dict[str, Any]) -> list[str]:
    """`stop` as a list; its limits (how many, how long) are the router's to check, for every client."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("`stop` must be a string or a list of strings", "stop")
    return stops


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Alternatives per token for a chat request: `top_logprobs`, which needs `logprobs: true`."""
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS + 1)
    if not _flag(body, "logprobs"):
        if top is not None:
            raise BadRequest("`top_logprobs` needs `logprobs: true`", "top_logprobs")
        return None
    return top or 0


def usage_of(completions: Sequence[pb.Completion]) -> dict[str, Any]:
    """Usage of the request. The prompt counts once, as OpenAI and vLLM's server count it for n choices
    (its figures are the first choice's); completion tokens are summed over the choices.
    `kv_transferred_tokens` is ours: prompt tokens whose KV a prefill worker computed and moved to the
    decode worker (not prefix-cache hits)."""
    first = completions[0].usage if completions else pb.Usage()
    prompt, cached, moved = first.prompt_tokens, first.cached_tokens, first.kv_transferred_tokens
    generated = sum(c.usage.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": cached, "kv_transferred_tokens": moved}}


def finish_reason_of(completion: pb.Completion) -> str:
    return FINISH_REASONS.get(completion.finish_reason, "stop")


def response_id(job: Job, request_id: str) -> str:
    return f"{'chatcmpl' if job.chat else 'cmpl'}-{request_id}"


def logprobs_of(job: Job, entries: Sequence[pb.TokenLogprob], text_offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's logprobs of these tokens: chat's `content` list, or the legacy completions object, whose
    `text_offset`s count from `text_offset` (the length of the choice's text before these tokens)."""
    if job.logprobs is None:
        return None
    if job.chat:
        return {"content": [{**_chat_entry(e.token, e.logprob),
                             "top_logprobs": [_chat_entry(top.token, top.logprob) for top in e.top_logprobs]}
                            for e in entries], "refusal": None}
    offsets = itertools.accumulate((len(e.token) for e in entries[:-1]), initial=text_offset)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [max(e.logprob, LOWEST_LOGPROB) for e in entries],
            # The chosen token is always listed, so there may be `logprobs` + 1 entries (as OpenAI does).
            "top_logprobs": [{**{top.token: max(top.logprob, LOWEST_LOGPROB) for top in e.top_logprobs},
                              e.token: max(e.logprob, LOWEST_LOGPROB)} for e in entries],
            "text_offset": list(offsets) if entries else []}


def _chat_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": max(logprob, LOWEST_LOGPROB), "bytes": list(token.encode())}


def choice(job: Job, index: int, *, text: str | None, token_ids: list[int] | None,
           logprobs: dict[str, Any] | None, finish_reason: str | None, streaming: bool) -> dict[str, Any]:
    """One choice; chat chunks carry a `delta`, whole chat answers a `message`, completions `text`."""
    if not job.chat:
        shaped: dict[str, Any] = {"index": index, "text": text or "", "logprobs": logprobs,
                                  "finish_reason": finish_reason}
    elif streaming:
        shaped = {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
    else:
        shaped = {"index": index, "message": {"role": "assistant", "content": text or ""},
                  "logprobs": logprobs, "finish_reason": finish_reason}
    if job.return_token_ids and token_ids is not None:
        shaped["token_ids"] = token_ids
    return shaped


def envelope(job: Job, request_id: str, choices: list[dict[str, Any]], *, streaming: bool,
             usage: dict[str, Any] | None = None) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if streaming else "chat.completion") if job.chat else "text_completion"
    body: dict[str, Any] = {"id": response_id(job, request_id), "object": kind, "created": job.created,
                            "model": job.model, "choices": choices}
    if usage is not None or not streaming or job.include_usage:
        body["usage"] = usage
    return body
