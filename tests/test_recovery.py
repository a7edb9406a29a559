"""Recovery, as real processes over real etcd: a worker restarted on its address is used again at once, a
frontend over two routers loses no new request when one is killed, /health answers while etcd is down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest

from dynamo_grpc.client import RouterClient
from tests.processes import RoleProcess
from tests.waiting import eventually

MODEL = "sim-tiny"
ENGINE = ("--engine", "simulated", "--model", MODEL, "--decode-step-s", "0.002")
LEASE = ("--lease-ttl-s", "2")


def _common(etcd) -> tuple[str, ...]:
    return ("--etcd", etcd.endpoint, "--namespace", "recovery", *LEASE)


@contextlib.asynccontextmanager
async def _processes(*procs: RoleProcess) -> AsyncIterator[None]:
    """Stop every process after, however the test ends (a replaced one is stopped by the test)."""
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()


@dataclass
class Load:
    """Requests sent back to back by a few clients, each outcome with the time it ended."""

    ok: list[float] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    failed_after_tokens: list[tuple[float, str]] = field(default_factory=list)
    """Streams that broke after their first tokens (their router died under them)."""


@pytest.mark.slow
async def test_a_decode_worker_restarted_on_its_port_is_used_again_at_once(etcd, tmp_path: Path) -> None:
    # (1) A router and one decode worker; a steady load through the router.
    decode = RoleProcess("decode", *_common(etcd), *ENGINE, log_dir=tmp_path)
    router = RoleProcess("router", *_common(etcd), log_dir=tmp_path)
    async with _processes(decode, router):
        await asyncio.gather(decode.wait_serving(), router.wait_serving())
        load, stop = Load(), asyncio.Event()
        async with RouterClient(router.endpoint, retries=0) as client:
            async def send() -> None:
                while not stop.is_set():
                    try:
                        await client.generate("restart", model=MODEL, max_tokens=4, ignore_eos=True).collect()
                        load.ok.append(time.monotonic())
                    except grpc.aio.AioRpcError as error:
                        load.failed.append((time.monotonic(), error.code().name))
                        await asyncio.sleep(0.02)

            senders = [asyncio.create_task(send()) for _ in range(4)]
            await _until(lambda: len(load.ok) >= 20, 30, "requests to flow")

            # (2) kill -9 the worker, and start it again on the same port once requests fail.
            decode.signal(signal.SIGKILL)
            decode.wait_exit()
            killed_at = time.monotonic()
            await _until(lambda: any(at > killed_at for at, _ in load.failed), 30, "requests to fail")
            restarted = RoleProcess("decode", *_common(etcd), *ENGINE, log_dir=tmp_path, port=decode.port)
            async with _processes(restarted):
                await restarted.wait_serving()
                listening_at = time.monotonic()

                # (3) Requests succeed again within a second or so of it listening, and all do from then on.
                await _until(lambda: any(at > listening_at for at in load.ok), 10, "a request to succeed")
                recovered_at = min(at for at in load.ok if at > listening_at)
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*senders)
        recovery_s = recovered_at - listening_at
        print(f"restarted decode worker answering {recovery_s:.3f} s after it listened; "
              f"{len(load.failed)} requests failed while it was down")
        assert recovery_s < 2.0, f"{recovery_s:.2f} s\n{router.log()}"
        assert not [code for at, code in load.failed if at > recovered_at], load.failed


@pytest.mark.slow
async def test_a_frontend_over_two_routers_loses_no_new_request_when_one_dies(etcd, tmp_path: Path) -> None:
    # (1) One decode worker, two routers, a frontend forwarding to both.
    decode = RoleProcess("decode", *_common(etcd), *ENGINE, log_dir=tmp_path)
    routers = [RoleProcess("router", *_common(etcd), log_dir=tmp_path) for _ in range(2)]
    frontend = RoleProcess("frontend", *_common(etcd), "--router", ",".join(r.endpoint for r in routers),
                           log_dir=tmp_path)
    url = f"http://{frontend.endpoint}"
    async with _processes(decode, *routers, frontend):
        await asyncio.gather(decode.wait_serving(), *(r.wait_serving() for r in routers))
        await frontend.wait_http_healthy()

        # (2) Streams back to back from a few clients; kill -9 one router among them.
        load, stop = Load(), asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async def send() -> None:
                while not stop.is_set():
                    await _stream_once(session, url, load)

            senders = [asyncio.create_task(send()) for _ in range(6)]
            await _until(lambda: len(load.ok) >= 30, 30, "requests to flow")
            routers[0].signal(signal.SIGKILL)
            killed_at, before = time.monotonic(), len(load.ok)
            await _until(lambda: len(load.ok) >= before + 60, 30, "requests to go on")
            stop.set()
            await asyncio.gather(*senders)

    # (3) No request failed before its first token; streams cut by the kill are counted apart.
    print(f"{len(load.ok)} streams completed; {len(load.failed_after_tokens)} cut after their first tokens "
          f"by the kill")
    assert load.failed == [], load.failed
    assert all(at >= killed_at for at, _ in load.failed_after_tokens), load.failed_after_tokens


async def _stream_once(session: aiohttp.ClientSession, url: str, load: Load) -> None:
    """One streamed completion; its outcome goes in `load`."""
    body = {"model": MODEL, "prompt": "two routers", "max_tokens": 24, "ignore_eos": True, "stream": True}
    tokens = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                load.failed.append((time.monotonic(), f"{response.status} {await response.text()}"))
                return
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    outcome = load.failed_after_tokens if tokens else load.failed
                    outcome.append((time.monotonic(), event["error"]["message"]))
                    return
                tokens += bool(event["choices"] and event["choices"][0]["text"])
    except aiohttp.ClientError as error:
        load.failed.append((time.monotonic(), repr(error)))
        return
    load.ok.append(time.monotonic())


@pytest.mark.slow
async def test_health_answers_at_once_from_its_view_while_etcd_is_down(etcd, tmp_path: Path) -> None:
    # (1) A frontend routing in its own process, over one decode worker.
    decode = RoleProcess("decode", *_common(etcd), *ENGINE, log_dir=tmp_path)
    frontend = RoleProcess("frontend", *_common(etcd), log_dir=tmp_path)
    url = f"http://{frontend.endpoint}"
    async with _processes(decode, frontend), aiohttp.ClientSession() as session:
        await decode.wait_serving()
        await frontend.wait_http_healthy()
        status, health, _ = await _get_health(session, url)
        assert (status, health["registry_connected"], health["view_age_s"]) == (200, True, 0.0), health

        # (2) etcd goes away: /health still answers at once, 200, saying how old its view is.
        etcd.stop()

        async def disconnected() -> bool:
            return (await _get_health(session, url))[1]["registry_connected"] is False
        await eventually(disconnected, 15, "/health to see etcd gone")
        await asyncio.sleep(0.5)
        status, health, took_s = await _get_health(session, url)
        print(f"/health with etcd down: {took_s * 1000:.1f} ms, {health}")
        assert status == 200 and health["status"] == "healthy" and health["decode_workers"] == 1, health
        assert health["view_age_s"] >= 0.5 and took_s < 0.5, (health, took_s)

        # (3) ... and generation goes on over that view.
        body = {"model": MODEL, "prompt": "no etcd", "max_tokens": 4, "ignore_eos": True}
        async with session.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["usage"]["completion_tokens"] == 4


async def _get_health(session: aiohttp.ClientSession, url: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with session.get(f"{url}/health") as response:
        return response.status, await response.json(), time.monotonic() - started


async def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    async def check() -> bool:
        return condition()
    await eventually(check, timeout_s, what)
