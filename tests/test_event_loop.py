"""Processes and async tests run on uvloop where it is installed; asyncio's loop stays selectable."""

from __future__ import annotations

import asyncio
import os

import uvloop

from dynamo_grpc import event_loop


async def running_loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_run_uses_the_chosen_loop() -> None:
    assert issubclass(event_loop.run(running_loop_type(), "uvloop"), uvloop.Loop)
    assert not issubclass(event_loop.run(running_loop_type(), "asyncio"), uvloop.Loop)


def test_loop_factory_makes_the_chosen_loop() -> None:
    for choice, is_uvloop in (("uvloop", True), ("asyncio", False)):
        loop = event_loop.loop_factory(choice)()
        try:
            assert isinstance(loop, uvloop.Loop) is is_uvloop, choice
        finally:
            loop.close()


async def test_async_tests_run_on_the_loop_the_cli_would_choose() -> None:
    on_uvloop = os.environ.get("DYNAMO_GRPC_EVENT_LOOP", "uvloop") == "uvloop"
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) is on_uvloop
