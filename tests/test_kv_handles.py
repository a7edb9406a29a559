"""KV handles from a hostile caller, over real sockets: a decode worker takes only handles its deployment signed,
no larger than its own KV of the prompt, under a deadline; a prefill worker holds only so much unpulled KV for
any one caller."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.cli import build_parser
from dynamo_grpc.client import GenerateStream, params
from dynamo_grpc.config import ConfigError
from dynamo_grpc.config import worker_config as worker_config_of
from dynamo_grpc.errors import error_reason
from dynamo_grpc.kv.handle_key import CLOCK_SKEW_S, KEY_ENV, KvKey
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.roles import start_decode
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from tests.cluster import KV_KEY, MODEL, Stubs, deployed, rpc_failure, worker_config

PERMISSION_DENIED, INVALID = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT
RSS_GROWTH_LIMIT = 50 << 20


@contextlib.asynccontextmanager
async def deployment(**settings: object) -> AsyncIterator[Stubs]:
    """The fast simulated deployment with `settings` of its workers changed (its KV key, limits)."""
    registry = MemoryRegistry()
    try:
        async with deployed(dataclasses.replace(worker_config(), **settings), registry) as stubs:
            yield stubs
    finally:
        await registry.close()


@dataclasses.dataclass
class Listener:
    """A TCP port that accepts connections, counts them and never answers."""

    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _held: list[asyncio.StreamWriter] = dataclasses.field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._held.append(writer)

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for writer in self._held:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    silent = Listener()
    await silent.start()
    yield silent
    await silent.stop()


def peak_rss() -> int:
    """This process's peak resident memory since `reset_peak_rss` (the deployment runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


async def prefill(stubs: Stubs, prompt: str | list[int] = "abc", request_id: str = "p") -> pb.KvHandle:
    request = prefill_pb.PrefillRequest(request_id=request_id, params=params(prompt, model=MODEL))
    return (await stubs.prefill.Prefill(request)).kv_handle


async def decode(stubs: Stubs, handle: pb.KvHandle, prompt: str | list[int] = "abc") -> decode_pb.DecodeResponse:
    async def requests():
        yield decode_pb.DecodeRequest(request_id="d", start=decode_pb.DecodeStart(
            params=params(prompt, model=MODEL, max_tokens=2), kv_handle=handle))

    return [response async for response in stubs.decode.Decode(requests())][-1]


async def release(stubs: Stubs, handle: pb.KvHandle) -> None:
    await stubs.kv.ReleaseKv(kv_pb.ReleaseKvRequest(transfer_id=handle.transfer_id, pull_token=handle.pull_token))


def pointed_at(handle: pb.KvHandle, endpoint: str, **changes: object) -> pb.KvHandle:
    """A copy of the handle that sends its puller to `endpoint` over gRPC only."""
    forged = pb.KvHandle()
    forged.CopyFrom(handle)
    forged.endpoint, forged.host, forged.shm_segment = endpoint, "", ""
    forged.ClearField("nixl")
    for name, value in changes.items():
        setattr(forged, name, value)
    return forged


FORGERIES = {
    "endpoint changed": lambda handle, listener: pointed_at(handle, listener.endpoint),
    "size changed to 1 GiB": lambda handle, listener: pointed_at(handle, listener.endpoint, total_bytes=1 << 30),
    "MAC removed": lambda handle, listener: pointed_at(handle, listener.endpoint, mac=b""),
    "MAC of another key": lambda handle, listener: pointed_at(handle, listener.endpoint, mac=b"\x01" * 32),
}


async def test_forged_handles_are_refused_before_any_connection_or_allocation(listener: Listener) -> None:
    async with deployment() as stubs:
        handle = await prefill(stubs)
        reset_peak_rss()
        before = peak_rss()
        refusals = {name: await rpc_failure(decode(stubs, forge(handle, listener)))
                    for name, forge in FORGERIES.items()}
        assert refusals == {**{name: (PERMISSION_DENIED, "BAD_KV_HANDLE_MAC") for name in FORGERIES},
                            "MAC removed": (PERMISSION_DENIED, "KV_HANDLE_UNSIGNED")}
        assert peak_rss() - before < RSS_GROWTH_LIMIT
        assert listener.connections == 0
        assert (await decode(stubs, handle)).completion.kv_transfer.bytes == handle.total_bytes  # still good
        await stubs.assert_no_leaks()


@contextlib.asynccontextmanager
async def keyless_decode(stubs: Stubs) -> AsyncIterator[Stubs]:
    """`stubs` with its decode stub on a decode worker of its own that has no KV key."""
    role = await start_decode(dataclasses.replace(worker_config(), kv_key=None), stubs.deployment.decode.registry)
    async with grpc.aio.insecure_channel(role.endpoint) as channel:
        keyless = dataclasses.replace(stubs)
        keyless.decode = decode_grpc.DecodeServiceStub(channel)
        try:
            yield keyless
        finally:
            await role.stop()


@pytest.mark.parametrize("key", ["signed by the deployment", "no key"])
@pytest.mark.parametrize("size", [1 << 30, 1 << 40], ids=["1 GiB", "1 TiB"])
async def test_a_handle_larger_than_the_prompts_kv_is_refused(listener: Listener, key: str, size: int) -> None:
    """Without a key, the size bound still holds: nothing is allocated and nothing connects."""
    async with deployment() as stubs:
        handle = await prefill(stubs)
        forged = pointed_at(handle, listener.endpoint, total_bytes=size)
        KV_KEY.sign(forged)
        async with contextlib.AsyncExitStack() as stack:
            target = stubs if key != "no key" else await stack.enter_async_context(keyless_decode(stubs))
            reset_peak_rss()
            before = peak_rss()
            with pytest.raises(grpc.aio.AioRpcError) as refusal:
                await decode(target, forged)
            assert (refusal.value.code(), error_reason(refusal.value)) == (INVALID, "KV_HANDLE_TOO_LARGE")
            assert str(size) in refusal.value.details()
            assert peak_rss() - before < RSS_GROWTH_LIMIT
            assert listener.connections == 0
        await release(stubs, handle)
        await stubs.assert_no_leaks()


async def test_a_pull_from_a_silent_endpoint_ends_at_its_deadline(listener: Listener) -> None:
    """A source that accepts the connection and never answers: the pull gives up within its deadline (the
    floor plus the bytes at the slowest rate), and the decode worker frees what it took."""
    async with deployment(kv_pull_timeout_s=1.0) as stubs:
        handle = await prefill(stubs)
        silent = pointed_at(handle, listener.endpoint)
        KV_KEY.sign(silent)  # a prefill worker of the deployment that hangs
        started = time.perf_counter()
        assert await rpc_failure(decode(stubs, silent)) == (grpc.StatusCode.DEADLINE_EXCEEDED, "KV_PULL_TIMEOUT")
        took = time.perf_counter() - started
        assert listener.connections >= 1
        assert 1.0 <= took < 3.0, f"the pull ended after {took:.2f} s"
        assert (await stubs.decode_stats()).used_kv_blocks == 0
        await release(stubs, handle)
        await stubs.assert_no_leaks()


async def test_replayed_and_expired_handles_are_refused(listener: Listener) -> None:
    async with deployment() as stubs:
        handle = await prefill(stubs)
        await decode(stubs, handle)
        assert await rpc_failure(decode(stubs, handle)) == (grpc.StatusCode.NOT_FOUND, "KV_HANDLE_NOT_FOUND")
        # Signed by the deployment, but its lease ended: refused without connecting anywhere.
        stale = pointed_at(handle, listener.endpoint)
        stale.lease_expires_at.FromNanoseconds(time.time_ns() - int((CLOCK_SKEW_S + 1) * 1e9))
        KV_KEY.sign(stale)
        assert await rpc_failure(decode(stubs, stale)) == (grpc.StatusCode.NOT_FOUND, "KV_HANDLE_EXPIRED")
        assert listener.connections == 0
        await stubs.assert_no_leaks()


async def test_one_caller_cannot_pin_the_prefill_workers_kv() -> None:
    """40 direct Prefill calls from one connection, each leaving 1/16 of the pool unpulled: the caller's
    half of the pool fills after 8 and the rest are refused before any work; routed requests still run."""
    async with deployment(kv_caller_fraction=0.5) as stubs:
        # A connection of its own, as from another process (channels in one process share connections).
        channel = grpc.aio.insecure_channel(stubs.deployment.prefill.endpoint,
                                            options=[("grpc.use_local_subchannel_pool", 1)])
        caller = dataclasses.replace(stubs)
        caller.prefill = prefill_grpc.PrefillServiceStub(channel)
        pool_tokens = 512 * 32  # FAST_ENGINE's blocks x tokens per block
        outcomes: list[str] = []
        held: list[pb.KvHandle] = []
        for i in range(40):
            prompt = [(i * 7 + t) % 250 + 1 for t in range(pool_tokens // 16)]
            try:
                held.append(await prefill(caller, prompt, request_id=f"pin-{i}"))
                outcomes.append("held")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert "MiB" in error.details() and "pull" in error.details(), error.details()
                outcomes.append(error_reason(error))
        assert outcomes == ["held"] * 8 + ["KV_HELD_LIMIT"] * 32
        stats = await stubs.prefill_stats()
        assert (stats.held_transfers, stats.requests_finished) == (8, 8)  # the refused ones never ran
        started = time.perf_counter()
        completion = (await GenerateStream(stubs.router.stub, "routed", params(
            "a routed request", model=MODEL, max_tokens=8)).collect()).completion
        took = time.perf_counter() - started
        assert completion.usage.kv_transferred_tokens == len("a routed request")  # prefilled on the prefill worker
        assert took < 2.0, f"the routed request took {took:.2f} s"  # 26 s while the pool was pinned
        for handle in held:
            await release(stubs, handle)
        await channel.close()
        await stubs.assert_no_leaks()


def test_the_kv_key_comes_from_its_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def key_of(*flags: str) -> KvKey | None:
        return worker_config_of(build_parser().parse_args(["decode", "--engine", "simulated", *flags])).kv_key

    handle = pb.KvHandle(transfer_id="t", endpoint="127.0.0.1:1", total_bytes=4096)
    KV_KEY.sign(handle)
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert key_of() is None  # no key: handles go unsigned and unchecked
    (tmp_path / "key").write_text(KV_KEY.hex() + "\n")
    from_file = key_of("--kv-key-file", str(tmp_path / "key"))
    monkeypatch.setenv(KEY_ENV, KV_KEY.hex())
    for key in (from_file, key_of()):
        assert key is not None and KV_KEY.hex() not in repr(key)
        key.verify(handle, request_id="r", now_s=0.0)  # the same key: the MAC holds
    (tmp_path / "short").write_text("abcd")
    with pytest.raises(ConfigError, match="--kv-key-file .*short: a KV key needs at least 32 bytes"):
        key_of("--kv-key-file", str(tmp_path / "short"))
