"""The worker registry against a real etcd (and its in-memory twin): registration, watches, leases."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

import pytest
from etcd3aio import Etcd3Client, prefix_range_end

from dynamo_grpc.registry import EtcdRegistry, MemoryRegistry, Registry, RegistryUnavailable, worker_key
from dynamo_grpc.v1 import common_pb2 as pb
from tests.etcd_server import EtcdServer, free_port

REPO = Path(__file__).resolve().parents[1]
NS = "test"
WAIT_S = 10.0
T = TypeVar("T")


def worker(worker_id: str, role: int = pb.WORKER_ROLE_DECODE, model: str = "sim-tiny") -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=worker_id, role=role, model=model, endpoint="127.0.0.1:1", host="node-a",
                         engine_fingerprint="fp-1", engine="simulated")


async def eventually(check: Callable[[], Awaitable[T]], timeout_s: float = WAIT_S,
                     what: str = "condition") -> T:
    """Poll an async check until it returns something truthy, then return it."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last result: {result!r}")
        await asyncio.sleep(0.05)


class Collector(Generic[T]):
    """Drains a watch in the background so a test can wait for the item it expects."""

    def __init__(self, source: AsyncIterator[T]) -> None:
        self.seen: list[T] = []
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._task = asyncio.create_task(self._drain(source))

    async def _drain(self, source: AsyncIterator[T]) -> None:
        async for item in source:
            self.seen.append(item)
            self._queue.put_nowait(item)

    async def until(self, predicate: Callable[[T], bool], timeout_s: float = WAIT_S) -> T:
        async def wait() -> T:
            while True:
                item = await self._queue.get()
                if predicate(item):
                    return item

        try:
            return await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"no matching item within {timeout_s}s; seen: {self.seen!r}") from None

    async def ended(self, timeout_s: float = WAIT_S) -> None:
        """Wait for the watch itself to finish."""
        await asyncio.wait_for(self._task, timeout_s)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def ids(workers: list[pb.WorkerInfo] | dict[str, pb.WorkerInfo]) -> list[str]:
    return [w.worker_id for w in workers] if isinstance(workers, list) else sorted(workers)


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    if request.param == "memory":
        impl: Registry = MemoryRegistry(namespace=NS)
    else:
        server: EtcdServer = request.getfixturevalue("etcd")
        impl = EtcdRegistry([server.endpoint], namespace=NS)
    async with impl:
        yield impl


async def test_register_list_deregister(registry: Registry) -> None:
    # Three workers of two roles join, out of order.
    await registry.register(worker("p1", pb.WORKER_ROLE_PREFILL))
    await registry.register(worker("d2"))
    await registry.register(worker("d1"))

    # Listing returns them sorted by worker_id, optionally filtered by role.
    assert ids(await registry.list_workers()) == ["d1", "d2", "p1"]
    assert ids(await registry.list_workers(pb.WORKER_ROLE_DECODE)) == ["d1", "d2"]
    assert ids(await registry.list_workers(pb.WORKER_ROLE_PREFILL)) == ["p1"]
    assert await registry.list_workers(pb.WORKER_ROLE_ROUTER) == []
    assert (await registry.list_workers(pb.WORKER_ROLE_DECODE))[0] == worker("d1")

    # Registering again replaces the entry instead of adding one.
    await registry.register(worker("p1", pb.WORKER_ROLE_PREFILL, model="other"))
    assert [w.model for w in await registry.list_workers(pb.WORKER_ROLE_PREFILL)] == ["other"]

    # Deregistering removes exactly that worker; unknown ids are a no-op.
    await registry.deregister("d2")
    await registry.deregister("never-registered")
    assert ids(await registry.list_workers()) == ["d1", "p1"]

    # A worker needs a concrete role.
    with pytest.raises(ValueError, match="role"):
        await registry.register(worker("nobody", pb.WORKER_ROLE_UNSPECIFIED))


async def test_watch_sees_put_and_delete(registry: Registry) -> None:
    # The first snapshot is the current (empty) fleet.
    watch = Collector(registry.watch_workers())
    try:
        assert await watch.until(lambda s: True) == {}

        # A join shows up as a new snapshot containing the worker.
        await registry.register(worker("w1"))
        first = await watch.until(lambda s: "w1" in s)
        assert first["w1"] == worker("w1")

        # Snapshots are independent: a consumer mutating one does not affect later ones.
        first.clear()
        await registry.register(worker("w2", pb.WORKER_ROLE_PREFILL))
        assert ids(await watch.until(lambda s: "w2" in s)) == ["w1", "w2"]

        # A leave shows up as a snapshot without it.
        await registry.deregister("w1")
        assert ids(await watch.until(lambda s: "w1" not in s)) == ["w2"]
    finally:
        await watch.stop()


async def test_documents(registry: Registry) -> None:
    # An absent document reads as None, and its watch starts with None.
    assert await registry.get_document("plan") is None
    watch = Collector(registry.watch_document("plan"))
    try:
        assert await watch.until(lambda v: True) is None

        # Every write is visible to readers and watchers.
        await registry.put_document("plan", b"v1")
        assert await registry.get_document("plan") == b"v1"
        assert await watch.until(lambda v: v is not None) == b"v1"
        await registry.put_document("plan", b"v2")
        assert await watch.until(lambda v: v != b"v1") == b"v2"

        # Other documents are separate keys.
        await registry.put_document("pairings", b"table")
        assert await registry.get_document("pairings") == b"table"
        assert await registry.get_document("plan") == b"v2"

        # Deletion reads as None again.
        await registry.delete_document("plan")
        assert await watch.until(lambda v: v is None) is None
        assert watch.seen == [None, b"v1", b"v2", None]
    finally:
        await watch.stop()

    # A name that would collide with the workers tree is refused.
    with pytest.raises(ValueError):
        await registry.put_document("workers", b"x")


async def test_etcd_key_layout_and_shared_lease(etcd: EtcdServer) -> None:
    async with EtcdRegistry([etcd.endpoint], namespace=NS) as registry, Etcd3Client([etcd.endpoint]) as raw:
        assert raw.kv is not None
        # Two workers and a document are written by one registry.
        await registry.register(worker("d1"))
        await registry.register(worker("p1", pb.WORKER_ROLE_PREFILL))
        await registry.put_document("plan", b"plan-bytes")

        # Workers sit under /dynamo-grpc/<ns>/workers/<role>/<id>, serialized, all under one lease.
        prefix = f"/dynamo-grpc/{NS}/"
        stored = {kv.key.decode(): kv for kv in (await raw.kv.get(prefix, prefix_range_end(prefix))).kvs}
        assert worker_key(NS, pb.WORKER_ROLE_DECODE, "d1") == f"/dynamo-grpc/{NS}/workers/decode/d1"
        assert sorted(stored) == [f"{prefix}plan", f"{prefix}workers/decode/d1",
                                  f"{prefix}workers/prefill/p1"]
        assert stored[f"{prefix}workers/decode/d1"].value == worker("d1").SerializeToString()
        leases = {kv.lease for key, kv in stored.items() if "/workers/" in key}
        assert len(leases) == 1 and leases != {0}

        # Documents outlive their writer, so they carry no lease.
        assert stored[f"{prefix}plan"].lease == 0

        # Another namespace sees none of it.
        async with EtcdRegistry([etcd.endpoint], namespace="elsewhere") as other:
            assert await other.list_workers() == []
            assert await other.get_document("plan") is None


CHILD = textwrap.dedent("""
    import asyncio, sys
    from dynamo_grpc.registry import EtcdRegistry
    from dynamo_grpc.v1 import common_pb2 as pb

    async def main():
        registry = EtcdRegistry([sys.argv[1]], namespace=sys.argv[2], lease_ttl_s=2)
        await registry.connect()
        info = pb.WorkerInfo(worker_id="doomed", role=pb.WORKER_ROLE_PREFILL, model="sim-tiny")
        await registry.register(info)
        print("registered", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_lease_expires_after_worker_process_is_killed(etcd: EtcdServer) -> None:
    async with EtcdRegistry([etcd.endpoint], namespace=NS) as observer:
        watch = Collector(observer.watch_workers())
        # A separate worker process registers with a 2 s lease and then just sleeps.
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath}
        child = subprocess.Popen([sys.executable, "-c", CHILD, etcd.endpoint, NS], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env, cwd=REPO)
        assert child.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
            if line.strip() != b"registered":
                child.kill()
                pytest.fail(f"worker process did not register: {(line + child.stdout.read()).decode()}")

            # It is listed, and the watcher has seen it join.
            assert ids(await observer.list_workers()) == ["doomed"]
            await watch.until(lambda s: "doomed" in s)

            # kill -9: no chance to deregister or revoke; only the lease TTL can remove it.
            killed_at = time.monotonic()
            child.send_signal(signal.SIGKILL)
            await asyncio.to_thread(child.wait, 10)

            await eventually(lambda: _absent(observer, "doomed"), timeout_s=2 + 3, what="the lease to expire")
            assert time.monotonic() - killed_at < 2 + 3
            # The watcher saw the delete as well.
            assert await watch.until(lambda s: "doomed" not in s) == {}
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            child.stdout.close()
            await watch.stop()


async def _absent(registry: Registry, worker_id: str) -> bool:
    return worker_id not in ids(await registry.list_workers())


@pytest.mark.slow
async def test_watch_and_registration_survive_etcd_restart(etcd: EtcdServer) -> None:
    async with (EtcdRegistry([etcd.endpoint], namespace=NS, lease_ttl_s=2) as early,
                EtcdRegistry([etcd.endpoint], namespace=NS) as observer):
        # A worker registers (its keepalive keeps running) and a watcher follows the fleet.
        await early.register(worker("before"))
        watch = Collector(observer.watch_workers())
        try:
            await watch.until(lambda s: "before" in s)

            # etcd restarts on the same ports and data dir; the event loop keeps running meanwhile.
            await asyncio.to_thread(etcd.restart)

            # A worker registering after the restart reaches the already-running watcher.
            async with EtcdRegistry([etcd.endpoint], namespace=NS) as late:
                await late.register(worker("after", pb.WORKER_ROLE_PREFILL))
                snapshot = await watch.until(lambda s: "after" in s and "before" in s, timeout_s=15)
                assert snapshot["after"] == worker("after", pb.WORKER_ROLE_PREFILL)

                # Longer than one lease TTL later, the pre-restart worker is still there: its
                # keepalive reconnected on its own.
                await asyncio.sleep(early.lease_ttl_s + 1)
                assert ids(await observer.list_workers()) == ["after", "before"]
        finally:
            await watch.stop()


async def test_lost_lease_is_regranted(etcd: EtcdServer) -> None:
    async with (EtcdRegistry([etcd.endpoint], namespace=NS, lease_ttl_s=2) as registry,
                Etcd3Client([etcd.endpoint]) as raw):
        assert raw.kv is not None and raw.lease is not None
        await registry.register(worker("phoenix"))
        key = worker_key(NS, pb.WORKER_ROLE_DECODE, "phoenix")
        old_lease = (await raw.kv.get(key)).kvs[0].lease

        # Revoke the registry's lease behind its back, as an expiry during a partition would.
        await raw.lease.revoke(old_lease)
        assert not (await raw.kv.get(key)).kvs

        # Its keepalive notices, grants a new lease and puts the worker back.
        async def reappeared() -> object:
            return (await raw.kv.get(key)).kvs

        (kv,) = await eventually(reappeared, timeout_s=5, what="the worker to be re-registered")
        assert kv.lease not in (0, old_lease)
        assert kv.value == worker("phoenix").SerializeToString()


async def test_close_removes_workers_at_once(etcd: EtcdServer) -> None:
    async with EtcdRegistry([etcd.endpoint], namespace=NS) as observer:
        registry = EtcdRegistry([etcd.endpoint], namespace=NS, lease_ttl_s=30)
        await registry.connect()
        await registry.register(worker("a"))
        await registry.register(worker("b", pb.WORKER_ROLE_ROUTER))
        assert ids(await observer.list_workers()) == ["a", "b"]

        # close() revokes the lease: gone immediately, not after 30 s.
        await registry.close()
        assert await observer.list_workers() == []
        await registry.close()


async def test_memory_close_withdraws_workers_and_ends_watches() -> None:
    # As with a revoked lease, closing withdraws what this registry registered and ends its watches.
    registry = MemoryRegistry()
    await registry.register(worker("a"))
    watch = Collector(registry.watch_workers())
    await watch.until(lambda s: "a" in s)
    await registry.close()
    await watch.ended()
    assert await registry.list_workers() == []


async def test_unreachable_etcd_fails_fast_with_a_clear_error() -> None:
    # Nothing listens on this port.
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="--etcd") as raised:
        async with EtcdRegistry([endpoint], namespace=NS):
            pass
    assert endpoint in str(raised.value)
    assert time.monotonic() - started < 8


def test_lease_ttl_must_be_at_least_etcds_minimum() -> None:
    with pytest.raises(ValueError, match="lease_ttl_s"):
        EtcdRegistry(["127.0.0.1:2379"], lease_ttl_s=1)
