"""KV transports on real sockets and real NIXL agents: each moves the bytes, a transport that breaks
mid-transfer hands over to the next or fails with its reason, and nothing stays registered, held or linked.

The prefill side's pieces (store, KvTransferService, NIXL agent) run in this process or, where a test
kills them mid-transfer, in a child process of their own.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import pytest_asyncio

from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.errors import DynamoError
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.nixl_transport import NixlAgent, nixl_installed
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import GrpcTransport, KvReceiver
from dynamo_grpc.kv.wire import SERVICE, add_kv_transfer_service
from dynamo_grpc.services.kv_transfer_service import KvTransferServicer
from dynamo_grpc.services.server import RunningServer, ServiceBinding, start_server
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc
from tests.waiting import eventually

needs_nixl = pytest.mark.skipif(not nixl_installed(), reason="the nixl package is not installed")
SHM, NIXL, GRPC = pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_NIXL, pb.KV_TRANSPORT_GRPC
FINGERPRINT = "fp"
BIG = 256 << 20
"""Large enough that UCX over TCP is still reading when the test kills the source."""


def payload(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(nbytes)


def segment_with(data: bytes) -> str:
    name = shm.new_segment_name()
    mapping = shm.create(name, len(data))
    mapping[:] = data
    mapping.close()
    return name


def segments_of(pid: int) -> list[str]:
    shm.wait_released()
    return [path.name for path in shm.SHM_DIR.glob(f"{shm.SEGMENT_PREFIX}{pid}-*")]


def own_segments(*held: pb.KvHandle) -> list[str]:
    """Segments this process made, but those the prefill side still holds for `held`."""
    holding = {handle.shm_segment for handle in held}
    return [name for name in segments_of(os.getpid()) if name not in holding]


@dataclass
class Prefill:
    """A prefill worker's KV side in this process: its store served over a real socket."""

    store: LeasedKvStore
    server: RunningServer

    async def hold(self, data: bytes) -> pb.KvHandle:
        return await self.store.hold_segment(segment_with(data), num_tokens=1, layout=pb.KvLayout(),
                                             fingerprint=FINGERPRINT)


@pytest_asyncio.fixture
async def serve_store() -> AsyncIterator[Callable[..., asyncio.Future]]:
    started: list[Prefill] = []

    async def start(*, nixl: bool = False, chunk_bytes: int = 1 << 20, ttl_s: float = 600) -> Prefill:
        store = LeasedKvStore(endpoint="", host="prefill-host", ttl_s=ttl_s,
                              nixl=NixlAgent() if nixl else None)
        servicer = KvTransferServicer(store, chunk_bytes=chunk_bytes)
        server = await start_server([ServiceBinding(servicer, add_kv_transfer_service, SERVICE)],
                                    host="127.0.0.1", port=0)
        store.endpoint = f"127.0.0.1:{server.port}"
        started.append(Prefill(store, server))
        return started[-1]

    yield start
    for prefill in started:
        await prefill.server.stop(0)
        prefill.store.close()
        if prefill.store.nixl is not None:
            prefill.store.nixl.close()


@pytest_asyncio.fixture
async def channels() -> AsyncIterator[ChannelPool]:
    pool = ChannelPool()
    yield pool
    await pool.close()


def receiver(channels: ChannelPool, *names: str) -> KvReceiver:
    return KvReceiver.over_network(channels, host="decode-host", names=names,
                                   nixl=NixlAgent() if "nixl" in names else None)


async def receive(kv: KvReceiver, handle: pb.KvHandle, *order: int):
    return await kv.receive(handle, prompt=[1], fingerprint=FINGERPRINT, request_id="r",
                            into_segment=True,
                            order=order)


def segment_bytes(name: str) -> bytes:
    with open(shm.SHM_DIR / name, "rb") as f:
        return f.read()


async def test_grpc_pulls_in_parallel_streams_and_the_last_chunk_frees_the_transfer(serve_store,
                                                                                     channels) -> None:
    prefill = await serve_store(chunk_bytes=256 << 10)
    data = payload(19 << 20)  # five streams' worth, not a multiple of the chunk or the stream size
    handle = await prefill.hold(data)
    kv = KvReceiver([GrpcTransport(channels, streams=5)])
    received = await receive(kv, handle, GRPC)
    try:
        moved = received.stats
        assert (moved.path, moved.bytes, moved.fallbacks) == ("grpc", len(data), [])
        assert segment_bytes(received.segment) == data
    finally:
        received.close()
    # (Freed by the pulls themselves: no ReleaseKv was sent.)
    assert (prefill.store.held_transfers, prefill.store.transfers_completed) == (0, 1)
    shm.wait_released()
    assert not shm.size_of(handle.shm_segment)
    assert not own_segments()


async def test_a_range_outside_the_transfer_is_refused(serve_store, channels) -> None:
    prefill = await serve_store()
    handle = await prefill.hold(payload(1000))
    stub = kv_grpc.KvTransferServiceStub(channels.get(prefill.store.endpoint))
    call = stub.PullKv(kv_pb.PullKvRequest(transfer_id=handle.transfer_id, pull_token=handle.pull_token,
                                           offset=900, length=200))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert prefill.store.held_transfers == 1  # still there for a proper pull


async def test_transfer_refusals_are_not_transport_failures(serve_store, channels) -> None:
    prefill = await serve_store()
    handle = await prefill.hold(payload(1000))
    wrong = pb.KvHandle()
    wrong.CopyFrom(handle)
    wrong.pull_token = "guess"
    with pytest.raises(DynamoError) as refused:
        await receive(receiver(channels, "grpc"), wrong, GRPC)
    assert refused.value.reason == "BAD_PULL_TOKEN"
    assert not own_segments(handle)


@needs_nixl
async def test_nixl_reads_registered_memory_and_leaves_nothing_registered(serve_store, channels) -> None:
    prefill = await serve_store(nixl=True)
    data = payload(8 << 20, seed=1)
    handle = await prefill.hold(data)
    assert handle.HasField("nixl") and handle.nixl.memory_kind == pb.NIXL_MEMORY_KIND_DRAM
    assert prefill.store.nixl.registrations == 1
    kv = receiver(channels, "shm", "nixl", "grpc")
    # The pair's order, from another host: NIXL first (shm does not reach across hosts).
    received = await receive(kv, handle, SHM, NIXL, GRPC)
    try:
        moved = received.stats
        assert (moved.path, moved.bytes, moved.fallbacks) == ("nixl", len(data), [])
        assert segment_bytes(received.segment) == data
    finally:
        received.close()
    assert (prefill.store.held_transfers, prefill.store.nixl.registrations) == (0, 0)
    stats = pb.WorkerStats()
    kv.add_stats(stats)
    assert stats.nixl_registrations == 0
    assert not own_segments()


def nixl_source(segment: str, sources: mp.Queue) -> None:
    """A prefill worker's NIXL agent in a process of its own: registers a held segment and serves READs of it
    until killed."""
    agent = NixlAgent()
    sources.put(agent.source(agent.register(shm.attach(segment))).SerializeToString())
    time.sleep(600)


async def read_while_killing_the_source(monkeypatch, kv_order: tuple[int, ...], serve_store, channels):
    """Hold BIG bytes here, offered over NIXL by a child process; start receiving, kill the child while NIXL
    reads (UCX over TCP, so the read takes a while). The receive's outcome, the handle, the data, the
    receiver and the prefill side."""
    monkeypatch.setenv("UCX_TLS", "tcp")
    prefill = await serve_store()
    data = payload(BIG, seed=2)
    handle = await prefill.hold(data)
    ctx = mp.get_context("spawn")
    sources: mp.Queue = ctx.Queue()
    child = ctx.Process(target=nixl_source, args=(handle.shm_segment, sources), daemon=True)
    child.start()
    try:
        handle.nixl.ParseFromString(await asyncio.to_thread(sources.get, timeout=60))
        kv = receiver(channels, "nixl", "grpc")
        nixl = kv.transports[0]
        receiving = asyncio.ensure_future(receive(kv, handle, *kv_order))

        async def reading() -> bool:
            return nixl.agent.registrations == 1 or receiving.done()

        await eventually(reading, 60, "the NIXL read to start")
        child.kill()
        outcome = await asyncio.gather(receiving, return_exceptions=True)
    finally:
        child.kill()
        child.join(10)
    return outcome[0], handle, data, kv, prefill

@needs_nixl
def test_an_idle_nixl_agent_sleeps() -> None:
    """The UCX progress thread waits in poll() between transfers rather than spinning a core."""
    agent = NixlAgent()
    try:
        time.sleep(0.5)  # the thread is up
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(3)
        used = (time.process_time() - cpu) / (time.monotonic() - wall)
    finally:
        agent.close()
    assert used < 0.05, f"an idle agent used {used:.0%} of a core"



@needs_nixl
@pytest.mark.slow
async def test_nixl_killed_mid_transfer_falls_back_to_grpc(monkeypatch, serve_store, channels) -> None:
    received, _, data, kv, prefill = await read_while_killing_the_source(monkeypatch, (NIXL, GRPC),
                                                                      serve_store, channels)
    assert not isinstance(received, BaseException), received
    try:
        assert received.stats.path == "grpc"
        [fallback] = received.stats.fallbacks
        assert fallback.startswith("nixl: ")
        assert segment_bytes(received.segment) == data
    finally:
        received.close()
    assert kv.transports[0].agent.registrations == 0 and prefill.store.held_transfers == 0
    assert not own_segments()


@needs_nixl
@pytest.mark.slow
async def test_nixl_killed_mid_transfer_with_nothing_to_fall_back_on_fails_with_its_reason(
        monkeypatch, serve_store, channels) -> None:
    failure, handle, _, kv, prefill = await read_while_killing_the_source(monkeypatch, (NIXL,), serve_store,
                                                                          channels)
    assert isinstance(failure, DynamoError), failure
    assert failure.code == grpc.StatusCode.UNAVAILABLE and failure.reason == "KV_TRANSFER_FAILED"
    assert "nixl: " in failure.message
    # Nothing registered or linked on the decode side; the prefill side still holds it until its lease ends.
    assert kv.transports[0].agent.registrations == 0 and not own_segments(handle)
    assert prefill.store.held_transfers == 1


def grpc_holder(nbytes: int, handles: mp.Queue) -> None:
    """A prefill worker's KvTransferService in a process of its own, until killed."""
    async def main() -> None:
        store = LeasedKvStore(endpoint="", host="prefill-host", ttl_s=600)
        servicer = KvTransferServicer(store, chunk_bytes=64 << 10)
        server = await start_server([ServiceBinding(servicer, add_kv_transfer_service, SERVICE)],
                                    host="127.0.0.1", port=0)
        store.endpoint = f"127.0.0.1:{server.port}"
        handles.put(store.hold(data=payload(nbytes), num_tokens=1, layout=pb.KvLayout(),
                               fingerprint=FINGERPRINT).SerializeToString())
        await asyncio.Event().wait()

    asyncio.run(main())


@pytest.mark.slow
async def test_grpc_killed_mid_transfer_fails_with_its_reason(channels) -> None:
    ctx = mp.get_context("spawn")
    handles: mp.Queue = ctx.Queue()
    holder = ctx.Process(target=grpc_holder, args=(BIG, handles), daemon=True)
    holder.start()
    try:
        handle = pb.KvHandle.FromString(await asyncio.to_thread(handles.get, timeout=60))
        kv = KvReceiver([GrpcTransport(channels, streams=1)])
        receiving = asyncio.ensure_future(receive(kv, handle, GRPC))

        async def arriving() -> bool:  # some bytes are in the decode worker's new segment
            return any((shm.SHM_DIR / name).stat().st_blocks for name in own_segments()) or receiving.done()

        await eventually(arriving, 60, "the first chunks to arrive")
        holder.kill()
        [failure] = await asyncio.gather(receiving, return_exceptions=True)
    finally:
        holder.kill()
        holder.join(10)
    assert isinstance(failure, DynamoError), failure
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "KV_TRANSFER_FAILED")
    assert "grpc: PullKv broke after" in failure.message
    assert not own_segments()


def puller(transport: str, ready: mp.Queue, handles: mp.Queue) -> None:
    """A decode worker's receiver in a process of its own, taking one handle's KV over `transport` into a
    segment, until killed."""
    os.environ["UCX_TLS"] = "tcp"  # slow enough to be killed mid-read

    async def main() -> None:
        kv = KvReceiver.over_network(ChannelPool(), host="decode-host", names=(transport,),
                                     nixl=NixlAgent() if transport == "nixl" else None)
        ready.put(os.getpid())
        handle = pb.KvHandle.FromString(await asyncio.to_thread(handles.get))
        await receive(kv, handle)

    asyncio.run(main())


def some_bytes_arrived(pid: int) -> bool:
    """Whether a segment of process `pid` has non-zero bytes (KV payloads are random; new segments zero)."""
    for path in map(shm.SHM_DIR.joinpath, segments_of(pid)):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if any(any(os.pread(f.fileno(), 4096, offset)) for offset in range(0, size, 1 << 20)):
                return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", pytest.param("nixl", marks=needs_nixl)])
async def test_a_puller_killed_mid_transfer_leaves_nothing_held_registered_or_linked_once_the_lease_ends(
        transport: str, serve_store) -> None:
    prefill = await serve_store(nixl=transport == "nixl", ttl_s=10)
    ctx = mp.get_context("spawn")
    ready, handles = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=puller, args=(transport, ready, handles), daemon=True)
    child.start()
    pid = child.pid
    try:
        assert pid == await asyncio.to_thread(ready.get, timeout=60)
        handle = await prefill.hold(payload(BIG, seed=3))
        handles.put(handle.SerializeToString())

        async def arriving() -> bool:
            return some_bytes_arrived(pid) or not child.is_alive()

        await eventually(arriving, 30, f"the first bytes over {transport}")
        assert child.is_alive(), "the pull finished before it could be killed"
        child.kill()
    finally:
        child.kill()
        child.join(10)
        left_by_the_dead = segments_of(pid)
        for name in left_by_the_dead:  # as a worker starting on this host does (`shm.sweep`)
            shm.unlink(name)
    assert len(left_by_the_dead) == 1
    # The prefill side holds the KV (and its NIXL registration) until the lease ends, then frees it all.
    assert prefill.store.held_transfers == 1
    registered = prefill.store.nixl.registrations if prefill.store.nixl is not None else 0
    assert registered == (transport == "nixl")

    async def freed() -> bool:
        return prefill.store.held_transfers == 0

    await eventually(freed, 30, "the lease to end")
    nixl_left = prefill.store.nixl.registrations if prefill.store.nixl is not None else 0
    assert (prefill.store.transfers_expired, nixl_left) == (1, 0)
    shm.wait_released()
    assert shm.size_of(handle.shm_segment) is None  # the prefill side's segment is gone too
