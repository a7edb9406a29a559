"""Shared fixtures."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_grpc.event_loop import loop_factory
from dynamo_grpc.tiny_model import build_tiny_model
from tests.etcd_server import EtcdServer
from tests.nginx import NGINX, TEMP_PATHS, nginx_config, self_signed_certificate
from tests.processes import free_port


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


@pytest.fixture
def nginx_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "nginx"
    folder.mkdir()
    for kind in TEMP_PATHS:
        (folder / kind).mkdir()
    folder.chmod(0o755)
    tmp_path.chmod(0o755)  # nginx's workers may run as another user when nginx starts as root
    return folder


@pytest.fixture
def nginx_proxy(nginx_folder: Path) -> Iterator[tuple[int, Path, Callable[..., None]]]:
    """(nginx's port, the certificate clients trust, a function that starts nginx in front of a router; its
    keyword arguments are `nginx_config`'s access checks)."""
    assert NGINX, "nginx is missing: apt-get install nginx (scripts/setup.sh does)"
    cert, key = self_signed_certificate(nginx_folder)
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(router: str, **access: Any) -> None:
        config = nginx_config(nginx_folder, port=port, router=router, cert=cert, key=key, **access)
        check = subprocess.run([NGINX, "-t", "-c", str(config)], check=False, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        procs.append(subprocess.Popen([NGINX, "-c", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))

    yield port, cert, start
    for proc in procs:
        proc.terminate()  # nginx's fast shutdown; it stops its worker itself
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on the loop the CLI runs on (uvloop; DYNAMO_GRPC_EVENT_LOOP=asyncio for asyncio's)."""
    choice = os.environ.get("DYNAMO_GRPC_EVENT_LOOP", "uvloop")
    return {choice: loop_factory(choice)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "etcd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.etcd)
