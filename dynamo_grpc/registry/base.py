"""The registry contract and the etcd key layout shared by every implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol

from dynamo_grpc.v1 import common_pb2 as pb

ROOT = "/dynamo-grpc"
WORKERS = "workers"


class RegistryUnavailable(Exception):
    """The backing store (etcd) cannot be reached."""


class RegistryAccessDenied(RegistryUnavailable):
    """etcd refused this process: wrong credentials or CA, or its user may not touch a key. Retrying does not
    help; the message says which setting or etcd role to change."""


def role_name(role: int) -> str:
    """Short lowercase role name used in keys, e.g. `prefill` for WORKER_ROLE_PREFILL."""
    if role == pb.WORKER_ROLE_UNSPECIFIED or role not in pb.WorkerRole.values():
        raise ValueError(f"a worker needs a concrete role (prefill, decode or router), got {role!r}")
    return pb.WorkerRole.Name(role).removeprefix("WORKER_ROLE_").lower()


def namespace_prefix(namespace: str) -> str:
    if not namespace or "/" in namespace:
        raise ValueError(f"namespace must be non-empty and contain no '/', got {namespace!r}")
    return f"{ROOT}/{namespace}/"


def workers_prefix(namespace: str, role: int = pb.WORKER_ROLE_UNSPECIFIED) -> str:
    """Key prefix of all workers, or of one role's workers."""
    base = f"{namespace_prefix(namespace)}{WORKERS}/"
    return base if role == pb.WORKER_ROLE_UNSPECIFIED else f"{base}{role_name(role)}/"


def worker_key(namespace: str, role: int, worker_id: str) -> str:
    """`/dynamo-grpc/<namespace>/workers/<role>/<worker_id>`."""
    if not worker_id or "/" in worker_id:
        raise ValueError(f"worker_id must be non-empty and contain no '/', got {worker_id!r}")
    return f"{workers_prefix(namespace)}{role_name(role)}/{worker_id}"


def document_key(namespace: str, name: str) -> str:
    """`/dynamo-grpc/<namespace>/<name>`; names may not shadow the workers tree."""
    if not name or "/" in name or name == WORKERS:
        raise ValueError(f"document name must be non-empty, without '/' and not {WORKERS!r}, got {name!r}")
    return f"{namespace_prefix(namespace)}{name}"


def all_roles() -> list[int]:
    return [role for role in pb.WorkerRole.values() if role != pb.WORKER_ROLE_UNSPECIFIED]


class Registry(Protocol):
    """Where workers announce themselves and routers/control planes discover them."""

    async def register(self, info: pb.WorkerInfo) -> None:
        """Announce a worker; it stays listed until deregistered or its owner goes away."""
        ...

    async def deregister(self, worker_id: str) -> None: ...

    async def list_workers(self, role: int = pb.WORKER_ROLE_UNSPECIFIED) -> list[pb.WorkerInfo]:
        """Workers of one role (all roles when unspecified), sorted by worker_id."""
        ...

    def watch_workers(self) -> AsyncIterator[dict[str, pb.WorkerInfo]]:
        """The full fleet (worker_id -> info) now, then again after every change."""
        ...

    async def put_document(self, name: str, data: bytes) -> None:
        """Publish a namespace-wide document (e.g. the pairing table); it outlives its writer."""
        ...

    async def get_document(self, name: str) -> bytes | None: ...

    async def delete_document(self, name: str) -> None: ...

    def watch_document(self, name: str) -> AsyncIterator[bytes | None]:
        """The document now, then after every change; None while it does not exist."""
        ...

    @property
    def watch_lost_at(self) -> float | None:
        """When one of this registry's watches broke and has not been re-established since (time.monotonic),
        so what it yields may be out of date; None while every watch is live."""
        ...

    async def close(self) -> None:
        """Withdraw everything this registry registered and release its resources."""
        ...

    async def __aenter__(self) -> Registry: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
