"""Helpers for our bidirectional streams: first message = the request, later messages = control.

The request path runs these once per request or once per message, so they avoid what costs there: a task
where a callback does, and `asyncio.get_running_loop()` (on CPython 3.11 a getpid system call each time;
`asyncio.Queue` and `asyncio.Event` look the loop up whenever they wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from dynamo_grpc.engine.base import EngineOutput
from dynamo_grpc.errors import InvalidArgument

log = logging.getLogger(__name__)

T = TypeVar("T")


async def first_message(requests: AsyncIterator[Any], start_field: str) -> Any:
    """The opening message, which must carry `start_field`."""
    async for message in requests:
        if message.WhichOneof("action") != start_field:
            raise InvalidArgument(f"the first message of the stream must set `{start_field}`",
                                  request_id=message.request_id, reason="STREAM_NOT_STARTED")
        return message
    raise InvalidArgument(f"the stream closed before a `{start_field}` message arrived", reason="STREAM_NOT_STARTED")


async def watch_for_cancel(requests: AsyncIterator[Any], request_id: str,
                           on_cancel: Callable[[], Awaitable[None]]) -> None:
    """Read the rest of the client's messages; run `on_cancel` once when a cancel arrives."""
    async for message in requests:
        action = message.WhichOneof("action")
        if action == "cancel":
            log.info("request %s: client cancelled (%s)", request_id, message.cancel.reason or "no reason given")
            await on_cancel()
            return
        log.warning("request %s: ignoring a second `%s` message on a running stream", request_id, action)


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None]) -> AsyncIterator[None]:
    """Run `coro` for the duration of the block, then cancel it."""
    task = asyncio.ensure_future(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class CancelSignal(asyncio.Event):
    """A request's cancel flag: an `asyncio.Event` that also runs callbacks when set, so a cancel reaches a
    downstream call at once without a task per request waiting for it."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        if self.is_set():
            return
        super().set()
        for callback in self._callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the flag is set (at once if it is set already)."""
        if self.is_set():
            callback()
        else:
            self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)


class Mailbox(Generic[T]):
    """Items handed from one task to one reader, in order, through a future of the loop it was made on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> T:
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._items.popleft()


class _Batcher:
    """Outputs merged until they may go out: the first at once, the last (finished) at once, the others at
    most every `interval_s`, so a fast engine's tokens travel in a few messages instead of one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._pending: EngineOutput | None = None
        self._failure: BaseException | None = None
        self._ended = False
        self._due = 0.0  # loop time from which pending tokens may go out
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def put(self, out: EngineOutput) -> None:
        if self._pending is None:
            self._pending = out
        else:
            self._pending.extend(out)
        self._wake()

    def end(self, failure: BaseException | None = None) -> None:
        self._ended, self._failure = True, failure
        self._wake()

    def _ready(self) -> bool:
        pending = self._pending
        if self._ended:
            return True
        return pending is not None and (pending.finish_reason is not None or self._loop.time() >= self._due)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._ready():
            waiter.set_result(None)
        elif self._pending is not None and self._timer is None:
            self._timer = self._loop.call_at(self._due, self._on_due)

    def _on_due(self) -> None:
        self._timer = None
        self._wake()

    async def next(self) -> EngineOutput | None:
        """The merged outputs once they may go out; None at the end; the source's failure after its outputs."""
        while not self._ready():
            self._waiter = self._loop.create_future()
            self._wake()
            try:
                await self._waiter
            finally:
                self._waiter = None
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
        out, self._pending = self._pending, None
        if out is not None:
            self._due = self._loop.time() + self._interval_s
            return out
        if self._failure is not None:
            raise self._failure
        return None


async def coalesce(outputs: AsyncIterator[EngineOutput], interval_s: float = 0.0) -> AsyncIterator[EngineOutput]:
    """Merge outputs into fewer, larger ones. The first goes out at once and so does the last (the one with a
    finish reason, with whatever waits before it); the others wait until `interval_s` has passed since the
    previous one went out, gathering what the engine makes meanwhile. With 0, only outputs that are ready
    together merge: then only a slow reader gets fewer messages.

    A gRPC message costs far more than a token id, so batching keeps a busy stream from becoming
    message-bound. Closing this iterator closes `outputs`.
    """
    loop = asyncio.get_running_loop()
    batcher = _Batcher(loop, interval_s)

    async def pump() -> None:
        try:
            async for out in outputs:
                batcher.put(out)
            batcher.end()
        except Exception as error:  # noqa: BLE001 - handed to the reader to raise
            batcher.end(error)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    task = loop.create_task(pump())
    try:
        while (out := await batcher.next()) is not None:
            yield out
            if out.finish_reason is not None:
                return
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def send_quietly(call: grpc.aio.StreamStreamCall, message: Any) -> None:
    """Write on a call that may have ended meanwhile; its outcome is then what reading it reports."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(message)


def open_bidi(method: Callable[[AsyncIterator[Any]], grpc.aio.StreamStreamCall], start: Any, cancel: Any,
              cancelled: CancelSignal) -> grpc.aio.StreamStreamCall:
    """Open one of our bidi calls: it sends `start`, then `cancel` once `cancelled` is set while the call is
    still running, whether or not anyone reads its responses."""
    outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def settle(ended: bool) -> None:
        if not outcome.done():
            outcome.set_result(ended)

    def on_cancel() -> None:
        settle(False)

    def on_end(_: object) -> None:
        settle(True)
        cancelled.remove_callback(on_cancel)

    call = method(start_then_cancel(start, cancel, outcome))
    cancelled.add_callback(on_cancel)
    call.add_done_callback(on_end)
    return call


async def start_then_cancel(start: Any, cancel: Any, outcome: asyncio.Future[bool]) -> AsyncIterator[Any]:
    """The messages of one of our bidi calls: `start`, then `cancel` if the request is cancelled before the
    call ends. `outcome` resolves at whichever comes first (True: the call ended), so gRPC's task sending
    these messages never outlives the call, and a cancel is sent for as long as the call runs."""
    yield start
    if not await outcome:
        yield cancel
