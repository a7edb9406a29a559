"""The event loop every process runs on: uvloop where installed, asyncio's own loop otherwise.

uvloop (libuv, in C) runs callbacks and socket I/O with less Python per event, and our request path is
mostly events: HTTP chunks, gRPC messages, task wake-ups (about 10-15% less CPU per request measured,
docs/experiments.md section 3). Without it everything still works, only slower, so a missing uvloop
falls back quietly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, TypeVar

EVENT_LOOPS = ("uvloop", "asyncio")

T = TypeVar("T")


def _uvloop(choice: str) -> ModuleType | None:
    if choice != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def loop_factory(choice: str = "uvloop") -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop function for `choice` (one of EVENT_LOOPS), falling back to asyncio's."""
    uvloop = _uvloop(choice)
    return uvloop.new_event_loop if uvloop is not None else asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str = "uvloop") -> T:
    """`asyncio.run(main)` on the loop `choice` names (falling back to asyncio's)."""
    uvloop = _uvloop(choice)
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)
