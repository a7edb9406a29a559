"""Stop strings, matched once for every engine: on the engine's detokenized text, in the decode path.

Text that could still be the start of a stop string is held back, with its tokens, until the next
output settles it; everything else passes at once. On a match the engine request is aborted and the
stream ends with FINISH_REASON_STOP, without the stop string and what follows it.

Migration: a decode worker that resumes a request starts with an empty matcher, and misses nothing.
Text already relayed can never be part of a match (it was released because no stop string could start
in it), and held-back tokens were never relayed, so the resuming worker generates them again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from dynamo_grpc.engine.base import EngineOutput, FinishReason


class StopMatcher:
    """Finds the first stop string in a stream of outputs, releasing text as soon as none can start in it."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held: list[EngineOutput] = []
        self._text = ""  # the held outputs' text

    def push(self, out: EngineOutput) -> tuple[EngineOutput | None, bool]:
        """Take the engine's next output. Returns what may be sent now (earlier held outputs merged into
        it), and whether a stop string ended here; then the returned text stops where the stop string
        starts."""
        self._held.append(out)
        self._text += out.text
        cut = min((at for at in (self._text.find(stop) for stop in self._stops) if at >= 0), default=None)
        if cut is not None:
            released = self._release(len(self._held))
            released.text = released.text[:cut]
            return released, True
        if out.finish_reason is not None:
            return self._release(len(self._held)), False
        settled, count = len(self._text) - self._open_prefix(), 0
        for held in self._held:
            settled -= len(held.text)
            if settled < 0:
                break
            count += 1
        return self._release(count), False

    def _open_prefix(self) -> int:
        """Length of the longest end of the held text that a stop string starts with."""
        text, longest = self._text, 0
        for stop in self._stops:
            at = text.find(stop[0], max(len(text) - len(stop) + 1, 0))
            while at >= 0 and not stop.startswith(text[at:]):
                at = text.find(stop[0], at + 1)
            if at >= 0:
                longest = max(longest, len(text) - at)
        return longest

    def _release(self, count: int) -> EngineOutput | None:
        """The first `count` held outputs as one."""
        if not count:
            return None
        released, self._held = self._held[:count], self._held[count:]
        merged = released[-1]
        for earlier in reversed(released[:-1]):
            merged.prepend(earlier)
        self._text = self._text[len(merged.text):]
        return merged


async def cut_at_stop_strings(outputs: AsyncIterator[EngineOutput], stops: tuple[str, ...],
                              abort: Callable[[], Awaitable[None]]) -> AsyncIterator[EngineOutput]:
    """`outputs` up to the first stop string; then the engine request is aborted and the stream ends with
    FinishReason.STOP. Usage counts the tokens returned, not those the engine made before the abort landed.
    Closing this iterator closes `outputs`."""
    matcher = StopMatcher(stops)
    try:
        async for out in outputs:
            released, stopped = matcher.push(out)
            if stopped:
                assert released is not None
                if released.finish_reason is None:
                    await abort()
                    await _finish_after_abort(outputs, released)
                released.finish_reason = FinishReason.STOP
                yield released
                return
            if released is not None:
                yield released
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


async def _finish_after_abort(outputs: AsyncIterator[EngineOutput], stopped: EngineOutput) -> None:
    """Read an aborted request's last outputs into `stopped`: its usage, less the tokens made after the stop
    string."""
    dropped = 0
    async for out in outputs:
        dropped += len(out.token_ids)
        if out.finish_reason is not None:
            if out.usage is not None:
                out.usage.completion_tokens -= dropped
            stopped.usage, stopped.kv_transfer = out.usage, out.kv_transfer
            return
