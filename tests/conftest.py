"""Shared fixtures."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynamo_grpc.event_loop import loop_factory
from dynamo_grpc.tiny_model import build_tiny_model
from tests.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny local Llama, built once per run (a few seconds)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh real etcd per test."""
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on the loop the CLI runs on (uvloop; DYNAMO_GRPC_EVENT_LOOP=asyncio for asyncio's)."""
    choice = os.environ.get("DYNAMO_GRPC_EVENT_LOOP", "uvloop")
    return {choice: loop_factory(choice)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "etcd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.etcd)
