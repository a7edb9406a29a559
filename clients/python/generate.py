"""dynamo-generate in Python: stream one generation from a router with `dynamo_grpc.client`.

The answer goes to stdout as it streams, then a newline; the completion's finish reason and usage go to
stderr. --cancel-after N sends the in-band cancel once N tokens have arrived; --timeout-s gives the request
a deadline; --sync runs the same request through `SyncRouterClient`, a blocking wrapper for code without an
event loop; --tls-ca, --tls-cert/--tls-key, --token, --deadline-s and --retries are the client's connection
options. Run it from the repository root (or anywhere with the project installed):

    python clients/python/generate.py --router 127.0.0.1:50051 --model tiny-llama "Hello"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's dynamo_grpc, if not installed

from dynamo_grpc.client import (
    RouterClient,
    SyncRouterClient,
    add_connection_flags,
    connection_options,
    params,
)
from dynamo_grpc.errors import error_reason
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import router_pb2 as router_pb

DEADLINE_GRACE_S = 1.0
"""How long past the request's deadline the client waits for a router that never answers."""


def generation_params(args: argparse.Namespace) -> pb.GenerationParams:
    """The request, with its deadline when --timeout-s is given: the router then ends it with
    DEADLINE_EXCEEDED (named in ErrorInfo) and frees its KV, as a cancel would."""
    request = params(args.prompt, model=args.model, max_tokens=args.max_tokens, temperature=args.temperature,
                     ignore_eos=args.ignore_eos)
    if args.timeout_s > 0:
        request.deadline.FromNanoseconds(time.time_ns() + int(args.timeout_s * 1e9))
    return request


def wait_s(args: argparse.Namespace) -> float | None:
    """The longest wait for the answer: the deadline plus a grace period, or forever without one."""
    return args.timeout_s + DEADLINE_GRACE_S if args.timeout_s > 0 else None


class Printer:
    """Prints text as it arrives, cancels after --cancel-after tokens, and sums up the completion."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.token_ids: list[int] = []

    def on_response(self, response: router_pb.GenerateResponse, cancel: Callable[[], None]
                    ) -> pb.Completion | None:
        if response.HasField("completion"):
            print(flush=True)
            return response.completion
        print(response.tokens.text, end="", flush=True)
        self.token_ids.extend(response.tokens.token_ids)
        if 0 < self.args.cancel_after <= len(self.token_ids):
            cancel()  # the first call sends the cancel; later ones do nothing
        return None

    def summary(self, completion: pb.Completion) -> None:
        if self.args.token_ids:
            print("token ids:", *self.token_ids, file=sys.stderr)
        usage = completion.usage
        print(f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
              f"finish: {pb.FinishReason.Name(completion.finish_reason)}]", file=sys.stderr)


async def generate_async(args: argparse.Namespace, printer: Printer, options: dict[str, Any]) -> pb.Completion:
    """The async client: iterate the stream; `stream.cancel()` sends the in-band cancel."""
    async with RouterClient(args.router, **options) as client:
        stream = client.open(args.request_id, generation_params(args))

        async def read() -> pb.Completion:
            async for response in stream:
                completion = printer.on_response(response, stream.cancel)
                if completion is not None:
                    return completion
            raise RuntimeError("the router closed the stream without a completion")

        # Leaving the loop early (here: wait_for cancelling it) cancels the call, so nothing runs on.
        return await asyncio.wait_for(read(), wait_s(args))


def generate_sync(args: argparse.Namespace, printer: Printer, options: dict[str, Any]) -> pb.Completion:
    """The same request through the blocking wrapper."""
    with SyncRouterClient(args.router, **options) as client:
        responses, cancel = client.generate(args.request_id, generation_params(args), wait_s(args))
        with contextlib.closing(responses):
            for response in responses:
                completion = printer.on_response(response, cancel)
                if completion is not None:
                    return completion
    raise RuntimeError("the router closed the stream without a completion")


def describe(error: grpc.RpcError) -> str:
    """A failed call in one line, `CODE REASON: message`, REASON being the ErrorInfo the server sent."""
    code = error.code().name
    reason = error_reason(error)
    return f"{code}{'' if reason == code else ' ' + reason}: {error.details()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="127.0.0.1:50051", help="router endpoint host:port")
    parser.add_argument("--model", default="tiny-llama", help="model name")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end-of-sequence token")
    parser.add_argument("--request-id", default="", help="request id (the router assigns one when empty)")
    parser.add_argument("--cancel-after", type=int, default=0,
                        help="send a cancel once this many tokens have arrived (0 = never)")
    parser.add_argument("--timeout-s", type=float, default=0.0,
                        help="the request's deadline in seconds (0 = none)")
    parser.add_argument("--token-ids", action="store_true",
                        help="also print the generated token ids on stderr")
    parser.add_argument("--sync", action="store_true", help="use the blocking SyncRouterClient")
    add_connection_flags(parser)
    parser.add_argument("prompt", help="prompt text")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    printer = Printer(args)
    try:
        options = connection_options(args)
    except ValueError as error:
        print(f"generate.py: {error}", file=sys.stderr)
        return 2
    try:
        completion = (generate_sync(args, printer, options) if args.sync
                      else asyncio.run(generate_async(args, printer, options)))
    except grpc.RpcError as error:
        failure = describe(error)
    except (TimeoutError, asyncio.TimeoutError):
        failure = f"DEADLINE_EXCEEDED: no answer from the router within {wait_s(args):g} s"
    else:
        printer.summary(completion)
        return 0
    if printer.token_ids:
        print(flush=True)
    print(f"generate.py: {failure}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
