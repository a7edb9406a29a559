"""The HTTP frontend's connection limits over raw sockets: unfinished headers, a slow body and idle keep-alive
connections are closed within their timeouts, a long stream is not; a 10 MB body is refused without the
frontend growing."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dynamo_grpc.frontend.backends import EmbeddedRouter
from dynamo_grpc.frontend.http import RunningFrontend, start_frontend
from tests.cluster import MODEL, running
from tests.processes import RoleProcess

IDLE_S, HEADER_S, BODY_S = 3.0, 0.5, 0.5
ENGINE = ("--engine", "simulated", "--model", MODEL)
HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n")


@pytest.fixture
async def frontend() -> AsyncIterator[RunningFrontend]:
    """A frontend with short timeouts, over a deployment whose tokens come every 10 ms."""
    async with running(decode_step_s=0.01) as stubs:
        router, registry = stubs.deployment.router.router, stubs.deployment.router.registry
        served = await start_frontend(EmbeddedRouter(router), registry, host="127.0.0.1", port=0,
                                      idle_timeout_s=IDLE_S, header_timeout_s=HEADER_S, body_timeout_s=BODY_S)
        try:
            yield served
        finally:
            await served.stop()


async def _closed_after(port: int, sent: bytes, *, trickle_s: float = 0.0) -> tuple[float, bytes]:
    """How long the server keeps a connection open that sent `sent` (a byte every `trickle_s` when set),
    and what it answered before closing it."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()

    async def send() -> None:
        for at in range(len(sent)) if trickle_s else [None]:
            writer.write(sent if at is None else sent[at:at + 1])
            await writer.drain()
            await asyncio.sleep(trickle_s)

    sending = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.read(), 15.0)  # returns once the server closes
        return loop.time() - started, answer
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()


async def test_slow_and_idle_connections_are_closed_within_their_timeouts(frontend: RunningFrontend) -> None:
    (idle_s, idle), (head_s, head), (trickled_s, trickled), (body_s, body) = await asyncio.gather(
        _closed_after(frontend.port, b""),
        _closed_after(frontend.port, HEAD),
        _closed_after(frontend.port, HEAD, trickle_s=0.05),  # a byte at a time: each resets nothing
        _closed_after(frontend.port, HEAD + b'\r\n{"model": '))
    # Unfinished headers go after the header timeout, well before a connection merely idle does.
    assert idle == head == trickled == b""
    assert HEADER_S <= head_s < IDLE_S - 1 and HEADER_S <= trickled_s < IDLE_S - 1, (head_s, trickled_s)
    assert IDLE_S - 0.2 <= idle_s < IDLE_S + 3, idle_s  # its clock starts as the server accepts
    # A body that stops coming gets 408 after the body timeout.
    assert body.startswith(b"HTTP/1.1 408") and b"request_timeout" in body
    assert BODY_S <= body_s < IDLE_S - 1, body_s


async def test_keep_alive_idles_out_but_a_long_stream_is_not_cut(frontend: RunningFrontend) -> None:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        # A stream that outlasts every timeout arrives whole.
        body = {"model": MODEL, "prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True}
        started = loop.time()
        async with session.post(f"{frontend.url}/v1/completions", json=body) as response:
            events = [line async for line in response.content if line.startswith(b"data: ")]
        assert loop.time() - started > IDLE_S and events[-1] == b"data: [DONE]\n", events[-3:]

    # After a response, a keep-alive connection is closed once idle for the idle timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", frontend.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    answered = loop.time()
    await asyncio.wait_for(reader.read(), 15.0)  # the rest of the body, then the close
    writer.close()
    assert IDLE_S - 0.2 <= loop.time() - answered < IDLE_S + 3


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


async def test_a_10_mb_body_is_refused_without_the_frontend_growing(etcd, tmp_path: Path) -> None:
    common = ("--etcd", etcd.endpoint, "--namespace", "bodies")
    decode = RoleProcess("decode", *common, *ENGINE, log_dir=tmp_path)
    frontend = RoleProcess("frontend", *common, log_dir=tmp_path)
    url = f"http://{frontend.endpoint}"
    try:
        await decode.wait_serving()
        await frontend.wait_http_healthy()
        before = _peak_rss_mib(frontend.proc.pid)
        prompt = b'{"model": "%s", "max_tokens": 1, "prompt": "' % MODEL.encode()
        body = prompt + b"x" * (10_000_000 - len(prompt) - 2) + b'"}'

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 2**16):
                yield body[start:start + 2**16]

        async with aiohttp.ClientSession() as session:
            for data in (io.BytesIO(body), io.BytesIO(body), chunked(), chunked()):  # length said, then not
                async with session.post(f"{url}/v1/completions", data=data,
                                        headers={"Content-Type": "application/json"}) as response:
                    assert response.status == 413, await response.text()
                    assert (await response.json())["error"]["code"] == "request_too_large"
        grown = _peak_rss_mib(frontend.proc.pid) - before
        print(f"frontend peak RSS {before:.0f} MiB before four 10 MB bodies, +{grown:.0f} MiB after")
        assert grown < 64, f"+{grown:.0f} MiB"  # it took over 1 GiB when such a body was parsed
    finally:
        frontend.stop()
        decode.stop()
