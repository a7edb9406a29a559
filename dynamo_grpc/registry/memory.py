"""In-process registry for single-process deployments and tests; no etcd, no leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType

from dynamo_grpc.registry.base import document_key, namespace_prefix, worker_key
from dynamo_grpc.v1 import common_pb2 as pb


class _Signal:
    """Wakes every waiter once per change; a fresh event per generation so no wake-up is lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class MemoryRegistry:
    """Same semantics as EtcdRegistry within one process; close() withdraws its workers."""

    def __init__(self, namespace: str = "default") -> None:
        namespace_prefix(namespace)
        self.namespace = namespace
        self._workers: dict[str, pb.WorkerInfo] = {}
        self._documents: dict[str, bytes] = {}
        self._workers_changed = _Signal()
        self._document_changed: dict[str, _Signal] = {}
        self._closed = False

    @property
    def watch_lost_at(self) -> float | None:
        return None  # in this process: never out of reach

    async def register(self, info: pb.WorkerInfo) -> None:
        worker_key(self.namespace, info.role, info.worker_id)
        self._check_open()
        self._workers[info.worker_id] = _copy(info)
        self._workers_changed.fire()

    async def deregister(self, worker_id: str) -> None:
        self._check_open()
        if self._workers.pop(worker_id, None) is not None:
            self._workers_changed.fire()

    async def list_workers(self, role: int = pb.WORKER_ROLE_UNSPECIFIED) -> list[pb.WorkerInfo]:
        return [_copy(w) for _, w in sorted(self._workers.items())
                if role == pb.WORKER_ROLE_UNSPECIFIED or w.role == role]

    async def watch_workers(self) -> AsyncIterator[dict[str, pb.WorkerInfo]]:
        while not self._closed:
            changed = self._workers_changed.current()
            yield {w.worker_id: w for w in await self.list_workers()}
            await changed.wait()

    async def put_document(self, name: str, data: bytes) -> None:
        document_key(self.namespace, name)
        self._check_open()
        self._documents[name] = bytes(data)
        self._document_signal(name).fire()

    async def get_document(self, name: str) -> bytes | None:
        document_key(self.namespace, name)
        return self._documents.get(name)

    async def delete_document(self, name: str) -> None:
        document_key(self.namespace, name)
        if self._documents.pop(name, None) is not None:
            self._document_signal(name).fire()

    async def watch_document(self, name: str) -> AsyncIterator[bytes | None]:
        document_key(self.namespace, name)
        signal = self._document_signal(name)
        while not self._closed:
            changed = signal.current()
            yield self._documents.get(name)
            await changed.wait()

    async def close(self) -> None:
        """Withdraw this registry's workers (as a revoked lease would) and end all watches."""
        if self._closed:
            return
        self._closed = True
        self._workers.clear()
        self._workers_changed.fire()
        for signal in self._document_changed.values():
            signal.fire()

    async def __aenter__(self) -> MemoryRegistry:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _document_signal(self, name: str) -> _Signal:
        return self._document_changed.setdefault(name, _Signal())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("registry is closed")


def _copy(info: pb.WorkerInfo) -> pb.WorkerInfo:
    copy = pb.WorkerInfo()
    copy.CopyFrom(info)
    return copy
