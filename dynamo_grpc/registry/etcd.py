"""Worker registry in etcd.

Each registry holds one lease for everything it registers, so when its process dies the workers
vanish from the fleet within the lease TTL, and close() removes them at once by revoking it.

With an `EtcdAccess` it speaks TLS and/or authenticates as an etcd user; etcd forgets auth tokens when they
sit idle past --auth-token-ttl or when it restarts, so a call refused for its token authenticates again once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio
from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchResponse
from etcd3aio.kv import KVService
from google.protobuf.message import DecodeError

from dynamo_grpc.registry.access import PASSWORD_ENV, EtcdAccess
from dynamo_grpc.registry.base import (
    WORKERS,
    RegistryAccessDenied,
    RegistryUnavailable,
    all_roles,
    document_key,
    namespace_prefix,
    worker_key,
    workers_prefix,
)
from dynamo_grpc.registry.documents import DEMAND_DOCUMENT
from dynamo_grpc.registry.setup_auth import CONTROL_PLANE_ROLE, READER_ROLE, WORKER_ROLE
from dynamo_grpc.v1 import common_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_LEASE_TTL_S = 2
OP_TIMEOUT_S = 5.0
_RPC_ATTEMPTS = 10
_RESYNC_BACKOFF_S = (0.1, 2.0)
# gRPC's default reconnect backoff grows to minutes; a registry must notice a restarted etcd within
# a lease TTL, and etcd3aio offers no public knob for it.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_FATAL_CODES = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
)
# What gRPC's messages say when the TLS session failed (handshake refused, client certificate missing).
_TLS_FAILURE_SIGNS = ("ssl", "handshake", "certificate", "tsi_", "unwrap failed")
# Which role of `dynamo-grpc etcd-setup-auth` may write where (docs/security.md).
_WRITER_ROLES = {WORKERS: WORKER_ROLE, DEMAND_DOCUMENT: READER_ROLE}


class EtcdRegistry:
    """Registry backed by etcd; survives etcd restarts and re-registers if its lease is lost."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        namespace: str = "default",
        lease_ttl_s: int = 10,
        connect_timeout_s: float = 3.0,
        access: EtcdAccess | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        if not endpoints:
            raise ValueError("endpoints must name at least one etcd host:port")
        if lease_ttl_s < MIN_LEASE_TTL_S:
            raise ValueError(f"lease_ttl_s must be at least {MIN_LEASE_TTL_S} (etcd's minimum lease), "
                             f"got {lease_ttl_s}")
        namespace_prefix(namespace)
        self.endpoints = tuple(endpoints)
        self.namespace = namespace
        self.lease_ttl_s = lease_ttl_s
        self.connect_timeout_s = connect_timeout_s
        self.access = access or EtcdAccess()
        self._token = ""
        self._auth_lock = asyncio.Lock()
        self._client: Etcd3Client | None = None
        self._lease_id = 0
        self._registered: dict[str, tuple[str, bytes]] = {}
        self._lease_lock = asyncio.Lock()
        self._keepalive_task: asyncio.Task[None] | None = None
        self._closed = False
        self._watches_lost: dict[str, float] = {}
        """Per key range followed whose watch is broken, since when."""

    async def connect(self) -> None:
        """Open the connection, failing fast with RegistryUnavailable if etcd does not answer."""
        if self._client is not None:
            return
        # With several endpoints gRPC cannot tell which name etcd's certificate must carry: the first one's.
        several = self.access.tls and len(self.endpoints) > 1
        client = Etcd3Client(list(self.endpoints), rpc_max_attempts=_RPC_ATTEMPTS,
                             tls_server_name=self.endpoints[0].rpartition(":")[0] if several else None,
                             **self.access.channel_credentials())
        client._manager.grpc_options.extend(_RECONNECT_OPTIONS)
        await client.connect()
        try:
            await self._ping(client)
        except BaseException:
            await client.close()
            raise
        self._client = client

    async def register(self, info: pb.WorkerInfo) -> None:
        key = worker_key(self.namespace, info.role, info.worker_id)
        value = info.SerializeToString()
        client, kv = self._connected(), self._kv()

        async def put() -> None:
            async with self._lease_lock:
                previous = self._registered.get(info.worker_id)
                if not self._lease_id:
                    await self._restore_lease(client)
                try:
                    await kv.put(key, value, lease=self._lease_id, timeout=OP_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    self._lease_id = 0
                    await self._restore_lease(client)
                    await kv.put(key, value, lease=self._lease_id, timeout=OP_TIMEOUT_S)
                if previous is not None and previous[0] != key:
                    await kv.delete(previous[0], timeout=OP_TIMEOUT_S)
                self._registered[info.worker_id] = (key, value)

        await self._call("registering " + info.worker_id, put, key=key, write=True)
        if self._keepalive_task is None:
            self._keepalive_task = asyncio.create_task(self._keepalive(), name="registry-lease-keepalive")

    async def deregister(self, worker_id: str) -> None:
        kv = self._kv()

        async def delete() -> None:
            async with self._lease_lock:
                entry = self._registered.get(worker_id)
                keys = [entry[0]] if entry else [worker_key(self.namespace, role, worker_id)
                                                 for role in all_roles()]
                await kv.txn([], [kv.txn_op_delete(k) for k in keys], timeout=OP_TIMEOUT_S)
                self._registered.pop(worker_id, None)

        await self._call("deregistering " + worker_id, delete, key=workers_prefix(self.namespace), write=True)

    async def list_workers(self, role: int = pb.WORKER_ROLE_UNSPECIFIED) -> list[pb.WorkerInfo]:
        prefix = workers_prefix(self.namespace, role)
        kv = self._kv()
        response = await self._call("listing workers", lambda: kv.get(prefix, prefix_range_end(prefix),
                                                                      timeout=OP_TIMEOUT_S), key=prefix)
        return _sorted_workers(entry.value for entry in response.kvs)

    async def watch_workers(self) -> AsyncIterator[dict[str, pb.WorkerInfo]]:
        prefix = workers_prefix(self.namespace)
        parsed: dict[bytes, pb.WorkerInfo | None] = {}  # by value: a fleet of 1,000 parses only what changed
        async with contextlib.aclosing(self._follow(prefix, prefix_range_end(prefix))) as states:
            async for state in states:
                parsed = {value: parsed[value] if value in parsed else _parse_worker(value)
                          for value in state.values()}
                workers = sorted((w for w in parsed.values() if w is not None), key=lambda w: w.worker_id)
                yield {w.worker_id: w for w in workers}

    async def put_document(self, name: str, data: bytes) -> None:
        key = document_key(self.namespace, name)
        kv = self._kv()
        await self._call(f"writing document {name!r}", lambda: kv.put(key, data, timeout=OP_TIMEOUT_S),
                         key=key, write=True)

    async def get_document(self, name: str) -> bytes | None:
        key = document_key(self.namespace, name)
        kv = self._kv()
        response = await self._call(f"reading document {name!r}", lambda: kv.get(key, timeout=OP_TIMEOUT_S),
                                    key=key)
        return bytes(response.kvs[0].value) if response.kvs else None

    async def delete_document(self, name: str) -> None:
        key = document_key(self.namespace, name)
        kv = self._kv()
        await self._call(f"deleting document {name!r}", lambda: kv.delete(key, timeout=OP_TIMEOUT_S),
                         key=key, write=True)

    async def watch_document(self, name: str) -> AsyncIterator[bytes | None]:
        key = document_key(self.namespace, name)
        async with contextlib.aclosing(self._follow(key, None)) as states:
            async for state in states:
                value = state.get(key.encode())
                yield None if value is None else bytes(value)

    async def close(self) -> None:
        """Stop the keepalive and revoke the lease so this registry's workers vanish immediately."""
        if self._closed:
            return
        self._closed = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            await asyncio.gather(self._keepalive_task, return_exceptions=True)
            self._keepalive_task = None
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._lease_id:
                lease, lease_id = client.lease, self._lease_id
                await self._with_token(lambda: lease.revoke(lease_id, timeout=2.0, max_attempts=2), client)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            log.warning("registry: could not revoke lease %x (%s); its %d workers vanish when it expires "
                        "within %ds", self._lease_id, _describe(exc), len(self._registered), self.lease_ttl_s)
        finally:
            self._lease_id = 0
            self._registered.clear()
            await client.close()

    @property
    def watch_lost_at(self) -> float | None:
        return min(self._watches_lost.values(), default=None)

    async def __aenter__(self) -> EtcdRegistry:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _ping(self, client: Etcd3Client) -> None:
        """Authenticate and make a linearizable read, retrying until the deadline so an etcd that is still
        starting is waited for; a refusal (credentials, permissions) fails at once."""
        assert client.kv is not None
        kv = client.kv
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        prefix = namespace_prefix(self.namespace)
        while True:
            remaining = max(deadline - loop.time(), 0.1)
            try:
                if self.access.user:
                    await self._authenticate(client, timeout=remaining)
                await kv.get(prefix, count_only=True, timeout=remaining, max_attempts=1)
                return
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
                refusal = self._refusal(exc, "connecting", prefix, write=False)
                if refusal:
                    raise RegistryAccessDenied(refusal) from exc
                if loop.time() + 0.2 >= deadline:
                    raise RegistryUnavailable(
                        f"cannot reach etcd at {', '.join(self.endpoints)} within "
                        f"{self.connect_timeout_s:g}s ({_describe(exc)}); {self._reach_hint(exc)}"
                    ) from exc
            await asyncio.sleep(0.2)

    async def _authenticate(self, client: Etcd3Client, *, timeout: float = OP_TIMEOUT_S) -> None:
        assert client.auth is not None
        client.set_token(None)  # etcd refuses even Authenticate with a token it no longer knows
        response = await client.auth.authenticate(self.access.user, self.access.password, timeout=timeout,
                                                  max_attempts=1)
        self._token = response.token
        client.set_token(response.token)

    async def _with_token(self, operation: Callable[[], Awaitable[T]],
                          client: Etcd3Client | None = None) -> T:
        """Run an etcd call; if etcd no longer knows our token (idle past its TTL, or etcd restarted),
        authenticate again and run it once more."""
        stale = self._token
        try:
            return await operation()
        except (EtcdUnauthenticatedError, grpc.aio.AioRpcError) as exc:  # streams raise gRPC's own errors
            unauthenticated = not isinstance(exc, grpc.aio.AioRpcError) or \
                exc.code() == grpc.StatusCode.UNAUTHENTICATED
            if not unauthenticated or not self.access.user:
                raise
        async with self._auth_lock:
            if self._token == stale:  # not renewed meanwhile by another call
                log.info("registry: etcd no longer accepts our auth token; authenticating again as %s",
                         self.access.user)
                await self._authenticate(client or self._connected())
        return await operation()

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]], *, key: str,
                    write: bool = False) -> T:
        """An etcd call on `key` (a key or prefix) that says what went wrong in terms a user can act on."""
        try:
            return await self._with_token(operation)
        except (EtcdConnectionError, EtcdTransientError, TimeoutError) as exc:
            raise RegistryUnavailable(
                f"etcd at {', '.join(self.endpoints)} unavailable while {what}: {_describe(exc)}") from exc
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            refusal = self._refusal(exc, what, key, write=write)
            if refusal:
                raise RegistryAccessDenied(refusal) from exc
            raise

    def _refusal(self, exc: BaseException, what: str, key: str, *, write: bool) -> str:
        """What to change when etcd refused us (bad credentials, no permission on `key`); "" otherwise."""
        where = f"etcd at {', '.join(self.endpoints)}"
        detail = _detail(exc)
        password_from = f"--etcd-password-file or {PASSWORD_ENV}"
        user = self.access.user
        if "authentication failed" in detail:
            return f"{where} refused user {user!r}: wrong user name or password (check {password_from})"
        if "authentication is not enabled" in detail:
            return (f"{where} has authentication off, yet --etcd-user {user} was given: turn it on "
                    "(`dynamo-grpc etcd-setup-auth`) or drop --etcd-user")
        if "user name is empty" in detail or (isinstance(exc, EtcdUnauthenticatedError) and not user):
            return (f"{where} requires authentication: pass --etcd-user with its password ({password_from}), "
                    "or a client certificate (--etcd-cert, --etcd-key) if etcd runs with --client-cert-auth")
        if isinstance(exc, EtcdPermissionDeniedError) or (
                isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.PERMISSION_DENIED):
            who = f"etcd user {user!r}" if user else "this client's etcd user"
            verb = "write" if write else "read"
            role = _writer_role(key, self.namespace) if write else "any role of `dynamo-grpc etcd-setup-auth`"
            return (f"{who} may not {verb} {key} ({what}): etcd said {detail!r}; give the user a role that "
                    f"may ({role}; see docs/security.md)")
        return ""

    def _reach_hint(self, exc: BaseException) -> str:
        detail = _detail(exc).lower()
        if self.access.tls and any(sign in detail for sign in _TLS_FAILURE_SIGNS):
            return (f"the TLS handshake failed: check that etcd serves https, that --etcd-ca "
                    f"{self.access.ca} is the CA that signed its certificate (which must name the address "
                    "dialled), and, if etcd runs with --client-cert-auth, --etcd-cert/--etcd-key")
        if self.access.tls:
            return "check that etcd serves https at that address"
        return ("start etcd (plain `etcd` listens on 127.0.0.1:2379) or pass --etcd host:port of a running "
                "one; if it serves https, pass --etcd-ca")

    def _connected(self) -> Etcd3Client:
        if self._client is None:
            state = "closed" if self._closed else "not connected; call connect() or use `async with`"
            raise RuntimeError(f"EtcdRegistry is {state}")
        return self._client

    def _kv(self) -> KVService:
        kv = self._connected().kv
        assert kv is not None
        return kv

    async def _restore_lease(self, client: Etcd3Client) -> None:
        """Grant a fresh lease and atomically re-put every registered worker under it."""
        assert client.kv is not None and client.lease is not None
        lease = await client.lease.grant(self.lease_ttl_s, timeout=OP_TIMEOUT_S)
        if self._registered:
            puts = [client.kv.txn_op_put(key, value, lease=lease.ID)
                    for key, value in self._registered.values()]
            await client.kv.txn([], puts, timeout=OP_TIMEOUT_S)
        self._lease_id = lease.ID

    async def _keepalive(self) -> None:
        """Renew the lease every ttl/3; re-register under a new lease if etcd dropped ours.

        Errors are logged and retried on the next tick: a dead keepalive would silently drop the
        workers from the fleet.
        """
        interval = self.lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._refresh_lease(timeout=interval)
            except Exception as exc:
                log.warning("registry: lease keepalive to etcd at %s failed (%s); retrying in %.1fs",
                            ", ".join(self.endpoints), _describe(exc), interval)

    async def _refresh_lease(self, *, timeout: float) -> None:
        client = self._connected()
        lease_id = self._lease_id
        if lease_id:
            renewal = self._with_token(lambda: _keep_alive_once(client, lease_id))
            ttl = await asyncio.wait_for(renewal, timeout)
            if ttl > 0:
                return
        async with self._lease_lock:
            if self._lease_id != lease_id:
                return
            if lease_id:
                log.warning("registry: etcd lease %x is gone; re-registering %d workers under a new lease",
                            lease_id, len(self._registered))
                self._lease_id = 0
            await self._with_token(lambda: self._restore_lease(client))

    async def _follow(self, key: str, range_end: bytes | None) -> AsyncIterator[dict[bytes, bytes]]:
        """Contents of a key range now, then after every change.

        Lists first and watches from the list's revision + 1, so no event falls in between; whenever
        the watch breaks (etcd restarted, connection lost, history compacted) it lists again.
        """
        state: dict[bytes, bytes] | None = None
        backoff = _RESYNC_BACKOFF_S[0]
        try:
            while not self._closed:
                try:
                    client = self._connected()
                    kv = self._kv()
                    listed = await self._with_token(lambda: kv.get(key, range_end, timeout=OP_TIMEOUT_S))
                    self._watches_lost.pop(key, None)
                    fresh = {entry.key: entry.value for entry in listed.kvs}
                    if fresh != state:
                        state = fresh
                        yield dict(state)
                    watch = _watch_stream(client, key, range_end, listed.header.revision + 1)
                    async with contextlib.aclosing(watch) as responses:
                        async for response in responses:
                            if response.canceled and "permission denied" in response.cancel_reason:
                                denied = EtcdPermissionDeniedError(response.cancel_reason)
                                raise RegistryAccessDenied(self._refusal(denied, "watching", key, write=False))
                            if response.canceled or response.compact_revision:
                                reason = response.cancel_reason or f"compacted at {response.compact_revision}"
                                raise _WatchCancelled(reason)
                            if not response.events:
                                continue
                            for event in response.events:
                                if event.type == event.DELETE:
                                    state.pop(event.kv.key, None)
                                else:
                                    state[event.kv.key] = event.kv.value
                            backoff = _RESYNC_BACKOFF_S[0]
                            yield dict(state)
                except asyncio.CancelledError:
                    if self._closed and _not_cancelling():
                        return
                    raise
                except Exception as exc:
                    if self._closed:
                        return
                    if not _retryable(exc):
                        raise
                    self._watches_lost.setdefault(key, time.monotonic())
                    log.warning("registry: watching %s failed (%s); listing again in %.1fs",
                                key, _describe(exc), backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _RESYNC_BACKOFF_S[1])
        finally:
            self._watches_lost.pop(key, None)  # nobody reads this range any more


class _WatchCancelled(EtcdError):
    """etcd ended a watch on its side (e.g. its start revision was compacted away)."""


async def _watch_stream(
    client: Etcd3Client, key: str, range_end: bytes | None, start_revision: int
) -> AsyncIterator[WatchResponse]:
    """One watch stream, ending or raising when it breaks; the caller resumes by listing again.

    etcd3aio's watch() feeds the stream from a request generator that never finishes, and when the
    stream fails gRPC leaves that feeder task pending forever; writing the create request on the call
    itself leaves nothing behind.
    """
    assert client.watch is not None
    call = client.watch._stub.Watch(metadata=client.watch._metadata or None)
    try:
        create = WatchCreateRequest(key=key.encode(), range_end=range_end or b"",
                                    start_revision=start_revision)
        await call.write(WatchRequest(create_request=create))
        while (response := await call.read()) is not grpc.aio.EOF:
            yield response
    finally:
        call.cancel()


async def _keep_alive_once(client: Etcd3Client, lease_id: int) -> int:
    """One keepalive round trip; returns the remaining TTL (<= 0 when etcd no longer has the lease)."""
    assert client.lease is not None
    stream = client.lease.keep_alive(lease_id)
    try:
        async for response in stream:
            return int(response.TTL)
    finally:
        stream.cancel()
    raise EtcdConnectionError(f"lease keepalive for {lease_id:x} ended without a response")


def _writer_role(key: str, namespace: str) -> str:
    """The role of `dynamo-grpc etcd-setup-auth` that may write `key`."""
    first = key.removeprefix(namespace_prefix(namespace)).split("/", 1)[0]
    return f"the {_WRITER_ROLES.get(first, CONTROL_PLANE_ROLE)} role"


def _sorted_workers(values: Iterable[bytes]) -> list[pb.WorkerInfo]:
    return sorted((w for w in map(_parse_worker, values) if w is not None), key=lambda w: w.worker_id)


def _parse_worker(value: bytes) -> pb.WorkerInfo | None:
    try:
        return pb.WorkerInfo.FromString(value)
    except DecodeError:
        log.warning("registry: skipping an undecodable worker entry (%d bytes)", len(value))
        return None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (EtcdUnauthenticatedError, EtcdPermissionDeniedError)):
        return False
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() not in _FATAL_CODES
    return isinstance(exc, (EtcdError, TimeoutError, asyncio.InvalidStateError))


def _detail(exc: BaseException) -> str:
    return (exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _not_cancelling() -> bool:
    """True when a CancelledError came from close() tearing down the channel, not from our task's owner."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0
