"""A small Python client for RouterService.Generate (what other languages generate from the protos).

`RouterClient` is the async client; `SyncRouterClient` puts a blocking face on it. Both take TLS (`Tls`, or a
CA's path or bytes), a bearer token, a per-call deadline and a number of retries, which happen only where
they are safe: a call that failed UNAVAILABLE before any response never started a generation.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dynamo_grpc.channels import CHANNEL_OPTIONS
from dynamo_grpc.security import PemSource, Tls, open_channel
from dynamo_grpc.services.streams import CancelSignal, open_bidi
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import router_pb2 as router_pb
from dynamo_grpc.v1 import router_pb2_grpc as router_grpc

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 3
FIRST_BACKOFF_S = 0.1
"""The wait before the first retry; each next one doubles it, up to MAX_BACKOFF_S."""
MAX_BACKOFF_S = 2.0
# The channel reconnects as often as the retries come: with gRPC's default (1 s, then longer) a retry would
# find the channel still failing from the last attempt and fail at once without trying.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", int(FIRST_BACKOFF_S * 1000)),
                     ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)))

@dataclass
class GenerateResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    completion: pb.Completion | None = None


class GenerateStream:
    """One running request: iterate for responses, `cancel()` to stop it server-side.

    `cancel()` sends the cancel in-band for as long as the call runs, read or not; reading on shows the
    router's CANCELLED completion. Leaving a loop over the stream early (break, an exception, a cancelled
    task) closes its iterator, and that cancels the call: the router and the workers stop the request and
    free its KV instead of generating for nobody. To stop reading for a while, hold one iterator
    (`responses = aiter(stream)`) and resume it.

    `timeout_s` bounds the whole request, retries included (DEADLINE_EXCEEDED). A call that fails with
    UNAVAILABLE before any response is made again, the same request, up to `retries` times with a doubling
    wait: the router never started it, so its request id is free. After a response nothing is retried: the
    error is raised, and the generation is not silently started over. `attempts` counts the calls made.
    With `fallbacks` (other routers), a retry goes to the next router in turn, at once while some router
    has not been tried yet.
    """

    def __init__(self, stub: router_grpc.RouterServiceStub, request_id: str, params: pb.GenerationParams, *,
                 metadata: Sequence[tuple[str, str]] | None = None, timeout_s: float | None = None,
                 retries: int = 0, fallbacks: Sequence[router_grpc.RouterServiceStub] = ()) -> None:
        self._cancel = CancelSignal()
        self._start = router_pb.GenerateRequest(request_id=request_id, start=params)
        self._cancel_message = router_pb.GenerateRequest(request_id=request_id,
                                                         cancel=pb.CancelAction(reason="client cancel"))
        self._methods = [stub.Generate, *(fallback.Generate for fallback in fallbacks)]
        self._metadata = metadata
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._retries_left = retries
        self.attempts = 0
        self.call = self._open()

    def _open(self) -> grpc.aio.StreamStreamCall:
        method = self._methods[self.attempts % len(self._methods)]
        self.attempts += 1
        if self._metadata is not None or self._deadline is not None:
            timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            method = functools.partial(method, metadata=self._metadata, timeout=timeout)
        return open_bidi(method, self._start, self._cancel_message, self._cancel)

    def cancel(self) -> None:
        self._cancel.set()

    async def __aiter__(self) -> AsyncIterator[router_pb.GenerateResponse]:
        answered = False
        try:
            while True:
                try:
                    async for response in self.call:
                        answered = True
                        yield response
                    return
                except grpc.aio.AioRpcError as error:
                    if answered or not await self._wait_to_retry(error):
                        raise
                self.call = self._open()
        finally:
            self.call.cancel()  # a no-op once the call has ended; else nobody reads the rest

    async def _wait_to_retry(self, error: grpc.aio.AioRpcError) -> bool:
        """Whether to make the call again, after waiting the backoff; only for UNAVAILABLE, while retries and
        time are left and nobody cancelled."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or self._retries_left <= 0 or self._cancel.is_set():
            return False
        rounds = self.attempts // len(self._methods)  # 0 while a router is still untried: no wait
        wait_s = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (rounds - 1)) if rounds else 0.0
        if self._deadline is not None and time.monotonic() + wait_s >= self._deadline:
            return False
        self._retries_left -= 1
        log.debug("request %s: UNAVAILABLE before any response (%s); retrying in %.1f s",
                  self._start.request_id or "(unnamed)", error.details(), wait_s)
        await asyncio.sleep(wait_s)
        return not self._cancel.is_set()

    async def collect(self) -> GenerateResult:
        result = GenerateResult()
        async for response in self:
            if response.HasField("tokens"):
                result.token_ids.extend(response.tokens.token_ids)
                result.text += response.tokens.text
            else:
                result.completion = response.completion
        return result


class RouterClient:
    """An async client of one RouterService endpoint (or a proxy in front of routers).

    `tls`: a `Tls`, or the path or PEM bytes of the CA to trust (plaintext without it). `token` goes with every
    call as `authorization: Bearer <token>`. `deadline_s` is each call's gRPC deadline (None: none).
    `retries`: how often a call failing UNAVAILABLE before its first response is made again (see
    `GenerateStream`).
    """

    def __init__(self, endpoint: str, *, tls: Tls | PemSource | None = None, token: str | None = None,
                 deadline_s: float | None = None, retries: int = DEFAULT_RETRIES) -> None:
        if tls is not None and not isinstance(tls, Tls):
            tls = Tls(root_certificates=tls)
        self.channel = open_channel(endpoint, tls, CHANNEL_OPTIONS + RECONNECT_OPTIONS)
        self.stub = router_grpc.RouterServiceStub(self.channel)
        self.metadata = None if token is None else (("authorization", f"Bearer {token}"),)
        self.deadline_s = deadline_s
        self.retries = retries

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    def open(self, request_id: str, params: pb.GenerationParams, *, deadline_s: float | None = None
             ) -> GenerateStream:
        """Start a request with this client's options; `deadline_s` overrides the client's."""
        return GenerateStream(self.stub, request_id, params, metadata=self.metadata,
                              timeout_s=self.deadline_s if deadline_s is None else deadline_s,
                              retries=self.retries)

    def generate(self, prompt: str | list[int], *, model: str, request_id: str = "", max_tokens: int = 16,
                 temperature: float = 0.0, ignore_eos: bool = False, deadline_s: float | None = None
                 ) -> GenerateStream:
        return self.open(request_id, params(prompt, model=model, max_tokens=max_tokens, temperature=temperature,
                                            ignore_eos=ignore_eos), deadline_s=deadline_s)


class SyncRouterClient:
    """A blocking face on `RouterClient` for code without an event loop, with the same options: the client
    runs on a loop of its own in a background thread, which reads each call's responses into a queue for the
    caller."""

    def __init__(self, endpoint: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="router-client", daemon=True)
        self._thread.start()
        self._client: RouterClient = self._run(self._open(endpoint, options))

    @staticmethod
    async def _open(endpoint: str, options: dict[str, Any]) -> RouterClient:
        return RouterClient(endpoint, **options)  # made on the loop its channel will run on

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, request_id: str, request: pb.GenerationParams, timeout_s: float | None = None
                 ) -> tuple[Iterator[router_pb.GenerateResponse], Callable[[], None]]:
        """The responses, and a function that sends the cancel (from any thread). `timeout_s` bounds the
        wait for the answer (TimeoutError); giving up, or leaving the loop early, cancels the call."""
        responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        done = object()

        async def pump(stream: GenerateStream) -> None:
            try:
                async for response in stream:
                    responses.put(response)
                responses.put(done)
            except Exception as error:  # noqa: BLE001 - raised in the caller's thread
                responses.put(error)

        async def start() -> tuple[GenerateStream, asyncio.Task[None]]:
            stream = self._client.open(request_id, request)  # the call starts on the loop
            return stream, asyncio.create_task(pump(stream))

        async def stop(task: asyncio.Task[None]) -> None:
            task.cancel()  # the pump leaves the stream, which cancels the call if it still runs
            await asyncio.gather(task, return_exceptions=True)

        stream, reading = self._run(start())
        give_up_at = None if timeout_s is None else time.monotonic() + timeout_s

        def iterate() -> Iterator[router_pb.GenerateResponse]:
            try:
                while True:
                    left = None if give_up_at is None else max(0.0, give_up_at - time.monotonic())
                    try:
                        item = responses.get(timeout=left)
                    except queue.Empty:
                        raise TimeoutError(f"no answer within {timeout_s:g} s") from None
                    if item is done:
                        return
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                self._run(stop(reading))

        return iterate(), lambda: self._loop.call_soon_threadsafe(stream.cancel)

    def close(self) -> None:
        self._run(self._client.channel.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncRouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of `RouterClient`'s options; `connection_options` reads them back."""
    parser.add_argument("--tls", action="store_true", help="TLS to the router (or its proxy), trusting the "
                        "system's CAs; --tls-ca, --tls-cert or --tls-server-name imply it")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate")
    parser.add_argument("--tls-cert", help="PEM file of this client's certificate chain (mutual TLS; with --tls-key)")
    parser.add_argument("--tls-key", help="PEM file of this client's private key (mutual TLS)")
    parser.add_argument("--tls-server-name", help="the name the server's certificate carries, when not the host")
    parser.add_argument("--token", default=os.environ.get("DYNAMO_GRPC_TOKEN"),
                        help="bearer token sent as `authorization` metadata [env DYNAMO_GRPC_TOKEN]")
    parser.add_argument("--deadline-s", type=float, default=None, help="the call's gRPC deadline in seconds")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help="retries of a call that fails UNAVAILABLE before its first response")


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """`RouterClient`'s keyword arguments from the flags of `add_connection_flags`; ValueError, naming the
    flag, for a file that cannot be read or a certificate without its key."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS)")
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = Tls(root_certificates=_read_flag("--tls-ca", args.tls_ca),
                  certificate_chain=_read_flag("--tls-cert", args.tls_cert),
                  private_key=_read_flag("--tls-key", args.tls_key), server_name=args.tls_server_name)
    return {"tls": tls, "token": args.token, "deadline_s": args.deadline_s, "retries": args.retries}


def _read_flag(flag: str, path: str | None) -> bytes | None:
    try:
        return None if path is None else Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{flag} {path}: {error.strerror}") from None


def params(prompt: str | list[int], *, model: str, max_tokens: int = 16, temperature: float = 0.0,
           ignore_eos: bool = False) -> pb.GenerationParams:
    form = pb.Prompt(text=prompt) if isinstance(prompt, str) else pb.Prompt(token_ids=pb.TokenIds(ids=prompt))
    return pb.GenerationParams(model=model, prompt=form, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
