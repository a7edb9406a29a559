"""Helpers for our bidirectional streams: first message = the request, later messages = control."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from dynamo_grpc.engine.base import EngineOutput
from dynamo_grpc.errors import InvalidArgument

log = logging.getLogger(__name__)


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


async def coalesce(outputs: AsyncIterator[EngineOutput]) -> AsyncIterator[EngineOutput]:
    """Merge outputs that are ready at once into one, so a slow reader gets fewer, larger messages.

    A gRPC message costs far more than a token id, so batching keeps a busy stream from becoming
    message-bound. Closing this iterator closes `outputs`.
    """
    queue: asyncio.Queue[EngineOutput | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for out in outputs:
                await queue.put(out)
            await queue.put(None)
        except Exception as error:  # noqa: BLE001 - handed to the reader to raise
            await queue.put(error)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            while isinstance(item, EngineOutput) and item.finish_reason is None and not queue.empty():
                more = queue.get_nowait()
                if not isinstance(more, EngineOutput):
                    yield item
                    item = more
                    break
                more.prepend(item)
                item = more
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def open_bidi(method: Callable[[AsyncIterator[Any]], grpc.aio.StreamStreamCall], start: Any, cancel: Any,
              cancelled: asyncio.Event) -> grpc.aio.StreamStreamCall:
    """Open one of our bidi calls: it sends `start`, then `cancel` once `cancelled` is set while the call is
    still running, whether or not anyone reads its responses."""
    ended = asyncio.Event()
    call = method(start_then_cancel(start, cancel, cancelled, ended))
    call.add_done_callback(lambda _: ended.set())
    return call


async def start_then_cancel(start: Any, cancel: Any, cancelled: asyncio.Event, ended: asyncio.Event
                            ) -> AsyncIterator[Any]:
    """The messages of one of our bidi calls: `start`, then `cancel` if `cancelled` is set first.
    `ended` is set when the call has ended (its status is in), so gRPC's task sending these messages never
    outlives the call, and a cancel is sent for as long as the call runs."""
    yield start
    await first_set(cancelled, ended)
    if not ended.is_set():
        yield cancel


async def first_set(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
