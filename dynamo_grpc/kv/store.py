"""The prefill side of KV transfer: KV bytes held under a lease until a decode worker pulls them.

A transfer is freed exactly once, by whichever comes first: the puller's release (a `ReleaseKv`, or gRPC
pulls that asked for it having sent every byte), the lease expiry (the decode worker never came), or
shutdown. Freeing deregisters the bytes from the NIXL agent, if the store has one, then runs the owner's
callback, which returns the engine's blocks.

Anyone who can call PrefillService makes the store hold KV until it is pulled or its lease ends; so that no
caller can pin the pool, `charge` counts each held transfer against the caller it was handed to, and
refuses one that would take that caller past `caller_limit_bytes`, or all held transfers past
`limit_bytes` (`set_limits`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import sys
import time
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from zlib_ng import zlib_ng

from dynamo_grpc.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.fingerprint import mismatch_hint
from dynamo_grpc.kv.handle_key import KvKey
from dynamo_grpc.kv.nixl_transport import NixlAgent, NixlFailure, Registration
from dynamo_grpc.v1 import common_pb2 as pb

log = logging.getLogger(__name__)


def prompt_digest(token_ids: Sequence[int]) -> bytes:
    """What a KV handle names its prompt by (`KvHandle.prompt_digest`): BLAKE2b-128 of the ids as
    little-endian uint32s, a few microseconds for a prompt of thousands of tokens."""
    ids = array("I", token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    return hashlib.blake2b(ids, digest_size=16).digest()

_FORGOTTEN_LIMIT = 4096


@dataclass
class _Held:
    handle: pb.KvHandle
    data: bytes | memoryview
    on_free: Callable[[], None] | None
    expiry: asyncio.TimerHandle | None = None
    registration: Registration | None = None
    sent: list[tuple[int, int]] = field(default_factory=list)
    """Byte ranges that pulls asking for a release have sent."""
    caller: str = ""
    """Who the handle was handed to (`charge`)."""


class LeasedKvStore:
    """KV bytes of finished prefills, each claimable with its own pull token until its lease ends."""

    def __init__(self, *, endpoint: str, host: str, ttl_s: float = 30.0,
                 nixl: NixlAgent | None = None, nixl_min_bytes: int = 0, key: KvKey | None = None) -> None:
        """With `nixl`, every held transfer of at least `nixl_min_bytes` is registered with that agent for
        decode workers to READ; with `key`, every handle is signed with it."""
        if ttl_s <= 0:
            raise ValueError(f"KV lease TTL must be positive, got {ttl_s}")
        self.endpoint = endpoint
        self.host = host
        self.ttl_s = ttl_s
        self.nixl = nixl
        self.nixl_min_bytes = nixl_min_bytes
        self.key = key
        self.limit_bytes: int | None = None
        self.caller_limit_bytes: int | None = None
        self._held: dict[str, _Held] = {}
        self._held_bytes = 0
        self._caller_bytes: dict[str, int] = {}
        # Recently freed transfer ids -> why, so a late puller learns "expired" rather than "unknown".
        self._forgotten: OrderedDict[str, str] = OrderedDict()
        self.transfers_completed = 0
        self.transfers_expired = 0

    def hold(self, *, data: bytes | memoryview, num_tokens: int, layout: pb.KvLayout, fingerprint: str,
             on_free: Callable[[], None] | None = None, ttl_s: float | None = None,
             shm_segment: str = "", crc32: int | None = None, prompt: Sequence[int] = (),
             shards: Sequence[pb.KvShard] = ()) -> pb.KvHandle:
        """Keep `data` for one pull and return the handle that claims it; `shm_segment` names the
        shared memory behind `data` for a same-host decode worker to read in place. `crc32`, when the
        caller computed it off the event loop, saves computing it here. `prompt`, the token ids the KV is
        of, goes in the handle as a digest; `shards`, its tensor-parallel parts, as they are (all of it
        is signed)."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        expires = timestamp_pb2.Timestamp()
        expires.FromNanoseconds(time.time_ns() + int(ttl * 1e9))
        handle = pb.KvHandle(
            transfer_id=uuid.uuid4().hex, endpoint=self.endpoint, pull_token=secrets.token_urlsafe(24),
            num_tokens=num_tokens, layout=layout, engine_fingerprint=fingerprint, lease_expires_at=expires,
            total_bytes=len(data), crc32=zlib_ng.crc32(data) if crc32 is None else crc32, host=self.host,
            shm_segment=shm_segment,
            prompt_digest=prompt_digest(prompt) if prompt else b"", shards=shards,
        )
        held = _Held(handle, data, on_free, registration=self._register(handle, data))
        if self.key is not None:
            self.key.sign(handle)
        held.expiry = asyncio.get_running_loop().call_later(ttl, self._expire, handle.transfer_id)
        self._held[handle.transfer_id] = held
        self._held_bytes += len(data)
        return handle

    async def hold_segment(self, segment: str, *, num_tokens: int, layout: pb.KvLayout, fingerprint: str,
                           prompt: Sequence[int] = (), shards: Sequence[pb.KvShard] = ()) -> pb.KvHandle:
        """Lease a shared-memory segment an engine wrote; freeing the transfer unlinks it. A decode worker
        on this host links it in place, others pull it over gRPC. `shards` name the tensor-parallel ranks
        whose equal parts the segment holds, back to back; their offsets, sizes and checksums are filled
        in."""
        mapping = shm.attach(segment)
        # About 4 ms per 64 MiB: off the event loop (zlib-ng releases the GIL), so other requests go on.
        crc, described = await asyncio.to_thread(_checksums, memoryview(mapping), shards)
        # The store drops its view on free; streams still sending keep theirs until they finish.
        return self.hold(data=memoryview(mapping), num_tokens=num_tokens, layout=layout,
                         fingerprint=fingerprint, on_free=lambda: shm.release_soon(segment),
                         shm_segment=segment, crc32=crc, prompt=prompt, shards=described)

    def claim(self, transfer_id: str, pull_token: str, fingerprint: str) -> bytes | memoryview:
        """The held bytes, if the caller proves it may have them."""
        held = self._lookup(transfer_id, pull_token)
        if fingerprint and fingerprint != held.handle.engine_fingerprint:
            raise FailedPrecondition(
                f"KV transfer {transfer_id} was produced by an incompatible engine "
                f"({held.handle.engine_fingerprint}); the puller runs {fingerprint}. "
                + mismatch_hint(held.handle.engine_fingerprint, fingerprint),
                reason="ENGINE_FINGERPRINT_MISMATCH")
        return held.data

    def release(self, transfer_id: str, pull_token: str, *, require_held: bool = False) -> bool:
        """Free a transfer after its pull; False when it is already gone (releasing is idempotent), or
        with `require_held` the NotFound that says why."""
        try:
            self._lookup(transfer_id, pull_token)
        except NotFound:
            if require_held:
                raise
            return False
        self._complete(transfer_id)
        return True

    def sent(self, transfer_id: str, pull_token: str, start: int, end: int) -> bool:
        """A pull that asked for the release sent bytes [start, end); once such pulls have sent every byte,
        the transfer is freed (True)."""
        try:
            held = self._lookup(transfer_id, pull_token)
        except NotFound:
            return False
        held.sent.append((start, end))
        covered = 0
        for first, last in sorted(held.sent):
            if first > covered:
                return False
            covered = max(covered, last)
        if covered < len(held.data):
            return False
        self._complete(transfer_id)
        return True

    def _complete(self, transfer_id: str) -> None:
        """Free a transfer its puller has taken."""
        self._free(transfer_id, "released")
        self.transfers_completed += 1

    def set_limits(self, *, pool_bytes: int, held_fraction: float, caller_fraction: float) -> None:
        """Let held transfers take at most `held_fraction` of a KV pool of `pool_bytes`, and those handed
        to any one caller at most `caller_fraction` of it."""
        self.limit_bytes = int(pool_bytes * held_fraction)
        self.caller_limit_bytes = int(pool_bytes * caller_fraction)

    def admit(self, caller: str, *, request_id: str) -> None:
        """Refuse, before any work is done for it, a caller whose transfers already fill its share (or all
        transfers theirs); `charge` checks the exact size once the KV exists."""
        mine = self._caller_bytes.get(caller, 0)
        if self.caller_limit_bytes is not None and mine and mine >= self.caller_limit_bytes:
            raise self._over_caller_limit(mine, request_id)
        if self.limit_bytes is not None and self._held_bytes and self._held_bytes >= self.limit_bytes:
            raise self._over_limit(self._held_bytes, request_id)

    def charge(self, transfer_id: str, caller: str, *, request_id: str) -> None:
        """Count a held transfer against the caller it is handed to. One that takes the caller past its share,
        or all transfers past theirs, is freed at once and refused with RESOURCE_EXHAUSTED; a caller or a
        store holding nothing is always given one."""
        held = self._held.get(transfer_id)
        if held is None:  # freed meanwhile (shutdown)
            return
        size, mine = len(held.data), self._caller_bytes.get(caller, 0)
        others = self._held_bytes - size
        refusal = None
        if self.caller_limit_bytes is not None and mine and mine + size > self.caller_limit_bytes:
            refusal = self._over_caller_limit(mine, request_id)
        elif self.limit_bytes is not None and others and others + size > self.limit_bytes:
            refusal = self._over_limit(others, request_id)
        if refusal is not None:
            self._free(transfer_id, "refused: over the held-KV limit")
            raise refusal
        held.caller = caller
        self._caller_bytes[caller] = mine + size

    def _over_caller_limit(self, mine: int, request_id: str) -> ResourceExhausted:
        assert self.caller_limit_bytes is not None
        return ResourceExhausted(
            f"this caller's unpulled KV transfers hold {mine / 2**20:.1f} MiB of the "
            f"{self.caller_limit_bytes / 2**20:.1f} MiB one caller may hold on this prefill worker; pull them (or "
            f"let their {self.ttl_s:g} s leases end) before prefilling more", request_id=request_id,
            reason="KV_HELD_LIMIT")

    def _over_limit(self, held: int, request_id: str) -> ResourceExhausted:
        assert self.limit_bytes is not None
        return ResourceExhausted(
            f"unpulled KV transfers hold {held / 2**20:.1f} MiB of the {self.limit_bytes / 2**20:.1f} MiB this "
            "prefill worker keeps for them; retry once decode workers have pulled them", request_id=request_id,
            reason="KV_HELD_LIMIT")

    def close(self) -> None:
        for transfer_id in list(self._held):
            self._free(transfer_id, "shut down")

    def add_stats(self, stats: pb.WorkerStats) -> None:
        """Fill the store's part of a worker's stats."""
        stats.held_transfers = self.held_transfers
        stats.held_kv_bytes = self.held_bytes
        stats.transfers_completed = self.transfers_completed
        stats.transfers_expired = self.transfers_expired
        if self.nixl is not None:
            stats.nixl_registrations = self.nixl.registrations

    @property
    def held_transfers(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def _lookup(self, transfer_id: str, pull_token: str) -> _Held:
        held = self._held.get(transfer_id)
        if held is None:
            why = self._forgotten.get(transfer_id)
            if why is None:
                raise NotFound(f"no KV transfer {transfer_id!r} on {self.endpoint}", reason="KV_HANDLE_NOT_FOUND")
            raise NotFound(f"KV transfer {transfer_id!r} is gone ({why}); prefill again",
                           reason="KV_HANDLE_EXPIRED" if why == "lease expired" else "KV_HANDLE_NOT_FOUND")
        if not hmac.compare_digest(held.handle.pull_token.encode(), pull_token.encode()):  # any text, not ASCII only
            raise PermissionDenied(f"wrong pull token for KV transfer {transfer_id!r}", reason="BAD_PULL_TOKEN")
        return held

    def _register(self, handle: pb.KvHandle, data: bytes | memoryview) -> Registration | None:
        """Offer the bytes to NIXL READs too; without a registration the handle offers shm and gRPC only."""
        if self.nixl is None or not len(data) or len(data) < self.nixl_min_bytes:
            return None
        try:
            registration = self.nixl.register(data)
            handle.nixl.CopyFrom(self.nixl.source(registration))
        except NixlFailure as error:
            log.warning("KV transfer %s is not offered over NIXL: %s", handle.transfer_id, error)
            return None
        return registration

    def _expire(self, transfer_id: str) -> None:
        if transfer_id in self._held:
            log.info("KV transfer %s expired unpulled after %.1f s", transfer_id, self.ttl_s)
            self._free(transfer_id, "lease expired")
            self.transfers_expired += 1

    def _free(self, transfer_id: str, why: str) -> None:
        held = self._held.pop(transfer_id)
        self._held_bytes -= len(held.data)
        if held.caller:
            left = self._caller_bytes.pop(held.caller) - len(held.data)
            if left:
                self._caller_bytes[held.caller] = left
        if held.expiry is not None:
            held.expiry.cancel()
        if held.registration is not None:
            assert self.nixl is not None
            self.nixl.deregister(held.registration)
        self._forgotten[transfer_id] = why
        while len(self._forgotten) > _FORGOTTEN_LIMIT:
            self._forgotten.popitem(last=False)
        if held.on_free is not None:
            held.on_free()


def _checksums(data: memoryview, shards: Sequence[pb.KvShard]) -> tuple[int, list[pb.KvShard]]:
    """The CRC-32 of all bytes, and the shards with their place and CRC-32 (one pass: the whole's CRC is
    combined from the shards')."""
    if not shards:
        return zlib_ng.crc32(data), []
    if len(data) % len(shards):
        raise ValueError(f"{len(data)} bytes do not split into {len(shards)} equal shards")
    size, crc, described = len(data) // len(shards), 0, []
    for i, shard in enumerate(shards):
        shard_crc = zlib_ng.crc32(data[i * size:(i + 1) * size])
        crc = zlib_ng.crc32_combine(crc, shard_crc, size)
        described.append(pb.KvShard(rank=shard.rank, first_kv_head=shard.first_kv_head,
                                    num_kv_heads=shard.num_kv_heads, offset=i * size, size=size,
                                    crc32=shard_crc))
    return crc, described
