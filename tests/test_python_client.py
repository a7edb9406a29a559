"""The Python client's options against a live `serve` (simulated engine): TLS, mutual TLS and the bearer token
through Debian's nginx, which refuses calls without them; a deadline; retries that happen while nothing was
answered (a port that starts listening late) and never once tokens have arrived (connections dropped mid-
stream by a TCP relay); the sync wrapper and `dynamo-grpc generate` with the same options."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.client import GenerateStream, RouterClient, SyncRouterClient, Tls, params
from dynamo_grpc.registry.etcd import EtcdRegistry
from dynamo_grpc.v1 import common_pb2 as pb
from tests.nginx import self_signed_certificate
from tests.processes import REPO, RoleProcess, free_port
from tests.test_mesh_nginx import worker_load
from tests.waiting import eventually

pytestmark = [pytest.mark.slow]

MODEL = "sim-tiny"
NAMESPACE = "pyclient"
TOKEN = "s3cret-token"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LONG = 100_000
"""Tokens no test waits for: at 5 ms a step, minutes of generation that a deadline or a drop must end."""


@dataclass
class Live:
    serve: RoleProcess
    registry: EtcdRegistry

    async def idle(self) -> bool:
        return await worker_load(self.registry) == (0, 0, 0, 0)


@pytest.fixture
async def live(etcd, tmp_path: Path) -> AsyncIterator[Live]:
    serve = RoleProcess("serve", "--etcd", etcd.endpoint, "--namespace", NAMESPACE, "--engine", "simulated",
                        "--model", MODEL, "--decode-step-s", "0.005", "--http-port", str(free_port()),
                        log_dir=tmp_path)
    registry = EtcdRegistry(etcd.endpoint, namespace=NAMESPACE)
    await registry.connect()
    try:
        await serve.wait_serving()
        yield Live(serve, registry)
    finally:
        await registry.close()
        serve.stop()


async def refused(client: RouterClient, calls: int = 10) -> grpc.aio.AioRpcError:
    """The status a call gets from nginx's refusal. grpcio's asyncio client may report a call that the
    server ended before the call's first message went out as INTERNAL "Internal error from Core" instead
    of the server's status (grpc/grpc#36066; about half of the calls nginx refuses at once): such calls
    are made again, up to `calls` in all. None may succeed."""
    async with client:
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.generate("refused", model=MODEL).collect()
            if failed.value.code() != grpc.StatusCode.INTERNAL:
                return failed.value
            assert failed.value.details() == "Internal error from Core", failed.value
    raise AssertionError(f"all {calls} refusals came back as grpcio's INTERNAL")


async def first_tokens(stream: GenerateStream) -> AsyncIterator[object]:
    """The stream's iterator, advanced past its first token batch."""
    responses = aiter(stream)
    while not (await anext(responses)).HasField("tokens"):
        pass
    return responses


async def test_tls_mutual_tls_token_and_deadline_through_nginx(
        live: Live, nginx_folder: Path, nginx_proxy: tuple[int, Path, Callable[..., None]]) -> None:
    port, ca, start_nginx = nginx_proxy
    client_cert, client_key = self_signed_certificate(nginx_folder, "client")
    start_nginx(live.serve.endpoint, token=TOKEN, client_ca=client_cert)
    address = f"127.0.0.1:{port}"
    mutual = Tls(root_certificates=ca, certificate_chain=client_cert, private_key=client_key)

    # Every option right: the tokens stream through nginx, which checked the certificate and the token.
    async with RouterClient(address, tls=mutual, token=TOKEN) as client:
        result = await client.generate("tls", model=MODEL, max_tokens=16, ignore_eos=True).collect()
    assert len(result.token_ids) == 16 and result.completion.finish_reason == pb.FINISH_REASON_LENGTH
    # The CA as PEM bytes does as well as its path; the token goes with each call of the stream.
    async with RouterClient(address, tls=Tls(ca.read_bytes(), client_cert.read_bytes(), client_key.read_bytes()),
                            token=TOKEN) as client:
        messages = [r async for r in client.generate("tls bytes", model=MODEL, max_tokens=64, ignore_eos=True)]
    assert len(messages) > 2, "tokens stream in several messages"

    # The token is what nginx checks: without it, or with another, nginx refuses the call.
    for token in (None, "wrong"):
        refusal = await refused(RouterClient(address, tls=mutual, token=token, retries=0))
        assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED
        assert refusal.details() == "a valid bearer token is required"
    # Without the client certificate (the CA as a path, the short form of `tls`): refused as well.
    refusal = await refused(RouterClient(address, tls=ca, token=TOKEN, retries=0))
    assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refusal.details() == "a client certificate is required"

    # Without the CA (the system's roots do not know nginx's certificate): UNAVAILABLE, saying why.
    async with RouterClient(address, tls=Tls(), token=TOKEN, retries=0) as client:
        with pytest.raises(grpc.aio.AioRpcError) as untrusted:
            await client.generate("no ca", model=MODEL).collect()
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.value.details(), untrusted.value.details()
    # Plaintext to the TLS port: UNAVAILABLE too.
    async with RouterClient(address, token=TOKEN, retries=0) as client:
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await client.generate("plaintext", model=MODEL).collect()
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

    # The client's deadline (grpc-timeout through nginx) ends a generation that would run for minutes; a
    # deadline given to one call overrides it.
    async with RouterClient(address, tls=mutual, token=TOKEN, deadline_s=1.0) as client:
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await client.generate("deadline", model=MODEL, max_tokens=LONG, ignore_eos=True).collect()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 1.0 <= time.monotonic() - began < 10
        short = await client.generate("short", model=MODEL, max_tokens=4, deadline_s=30).collect()
        assert len(short.token_ids) == 4
    await eventually(live.idle, 10, what="workers idle after the deadline")

    # The blocking wrapper takes the same options.
    def sync_generate() -> list[int]:
        with SyncRouterClient(address, tls=mutual, token=TOKEN, deadline_s=30) as client:
            responses, _ = client.generate("sync", params("sync", model=MODEL, max_tokens=8, ignore_eos=True))
            return [t for r in responses if r.HasField("tokens") for t in r.tokens.token_ids]
    assert len(await asyncio.to_thread(sync_generate)) == 8

    # And so does `dynamo-grpc generate`.
    cli = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "dynamo_grpc.cli", "generate", "--router", address, "--model", MODEL,
        "--max-tokens", "8", "--tls-ca", str(ca), "--tls-cert", str(client_cert), "--tls-key", str(client_key),
        "--token", TOKEN, "--deadline-s", "30", "hello"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "8 completion tokens" in cli.stderr and cli.stdout.strip()
    cli = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "dynamo_grpc.cli", "generate", "--router", address, "--tls-cert", str(client_cert),
        "hello"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2
    assert cli.stderr.strip() == "dynamo-grpc generate: --tls-cert and --tls-key go together (mutual TLS)"


class Relay:
    """A TCP port in front of the router that listens only from `listen()` on, and can drop every
    connection it carries at once (a reset, as a crashed proxy or a broken network gives)."""

    def __init__(self, target: str) -> None:
        self.port = free_port()
        self.target_host, target_port = target.rsplit(":", 1)
        self.target_port = int(target_port)
        self.server: asyncio.Server | None = None
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def drop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.drop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


async def test_retries_only_before_the_first_token(live: Live) -> None:
    relay = Relay(live.serve.endpoint)
    try:
        async with RouterClient(f"127.0.0.1:{relay.port}", retries=10) as client:
            # Nothing listens yet: the first call fails UNAVAILABLE; the port opens while the client waits
            # to retry, and the same request, under the same id, streams every token.
            stream = client.generate("late", model=MODEL, request_id="late-listener", max_tokens=32,
                                     ignore_eos=True)
            collecting = asyncio.create_task(stream.collect())
            async def retrying() -> bool:
                return stream.attempts >= 2

            await eventually(retrying, 10, what="a retry after UNAVAILABLE")
            await relay.listen()
            result = await asyncio.wait_for(collecting, 30)
            assert len(result.token_ids) == 32 and result.completion.finish_reason == pb.FINISH_REASON_LENGTH
            assert stream.attempts >= 2 and relay.connections >= 1

            # A refusal of another kind is not retried.
            stream = client.generate("unknown", model="no-such-model")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stream.collect()
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND and stream.attempts == 1

            # Tokens have arrived when every connection drops: the client raises UNAVAILABLE; it does not
            # start the generation over, though the relay would carry a new call; the router stops it.
            stream = client.generate("dropped", model=MODEL, request_id="dropped", max_tokens=LONG,
                                     ignore_eos=True)
            responses = await first_tokens(stream)
            assert (await worker_load(live.registry))[0] == 1, "the generation runs on the decode worker"
            relay.drop()
            with pytest.raises(grpc.aio.AioRpcError) as dropped:
                async for _ in responses:
                    pass
            assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stream.attempts == 1
            await eventually(live.idle, 10, what="workers idle after the connection dropped")
            again = await client.generate("after the drop", model=MODEL, max_tokens=4).collect()
            assert len(again.token_ids) == 4, "the relay carries new calls"

        # Retries run out: the last UNAVAILABLE is raised after 1 + retries calls.
        async with RouterClient(f"127.0.0.1:{free_port()}", retries=2) as client:
            stream = client.generate("nobody", model=MODEL)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stream.collect()
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE and stream.attempts == 3
    finally:
        await relay.close()
