"""The prefill side's leased KV store: claims, tokens, release and expiry, with no leaks."""

from __future__ import annotations

import zlib

import pytest

from dynamo_grpc.errors import FailedPrecondition, NotFound, PermissionDenied
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.v1 import common_pb2 as pb
from tests.waiting import eventually


def hold(store: LeasedKvStore, data: bytes = b"kv" * 100, **kwargs) -> tuple[pb.KvHandle, list[str]]:
    freed: list[str] = []
    handle = store.hold(data=data, num_tokens=10, layout=pb.KvLayout(block_size=32), fingerprint="fp",
                        on_free=lambda: freed.append("freed"), **kwargs)
    return handle, freed


async def test_claim_needs_the_pull_token_and_release_frees_once() -> None:
    store = LeasedKvStore(endpoint="127.0.0.1:1", host="h", ttl_s=30)
    handle, freed = hold(store)
    assert handle.total_bytes == 200 and handle.crc32 == zlib.crc32(b"kv" * 100)
    assert handle.endpoint == "127.0.0.1:1" and handle.lease_expires_at.seconds > 0

    assert store.claim(handle.transfer_id, handle.pull_token, "fp") == b"kv" * 100
    with pytest.raises(PermissionDenied):
        store.claim(handle.transfer_id, "not-the-token", "fp")
    with pytest.raises(FailedPrecondition) as mismatch:
        store.claim(handle.transfer_id, handle.pull_token, "another-engine")
    assert mismatch.value.reason == "ENGINE_FINGERPRINT_MISMATCH"

    assert store.release(handle.transfer_id, handle.pull_token) is True
    assert store.release(handle.transfer_id, handle.pull_token) is False
    assert freed == ["freed"]
    assert (store.held_transfers, store.held_bytes, store.transfers_completed) == (0, 0, 1)


async def test_unknown_transfer_is_not_found() -> None:
    store = LeasedKvStore(endpoint="e", host="h")
    with pytest.raises(NotFound) as error:
        store.claim("no-such-transfer", "token", "fp")
    assert error.value.reason == "KV_HANDLE_NOT_FOUND"


async def test_unpulled_transfer_expires_and_frees_its_blocks() -> None:
    store = LeasedKvStore(endpoint="e", host="h", ttl_s=30)
    handle, freed = hold(store, ttl_s=0.05)

    async def freed_once() -> bool:
        return freed == ["freed"]

    await eventually(freed_once, 2.0, "the lease to expire")
    assert (store.held_transfers, store.transfers_expired) == (0, 1)
    with pytest.raises(NotFound) as error:
        store.claim(handle.transfer_id, handle.pull_token, "fp")
    assert error.value.reason == "KV_HANDLE_EXPIRED"


async def test_close_frees_everything() -> None:
    store = LeasedKvStore(endpoint="e", host="h")
    _, freed_a = hold(store)
    _, freed_b = hold(store)
    store.close()
    assert freed_a == freed_b == ["freed"] and store.held_transfers == 0


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="TTL"):
        LeasedKvStore(endpoint="e", host="h", ttl_s=0)


async def test_a_segment_of_tensor_parallel_shards_is_described_shard_by_shard() -> None:
    import os

    from dynamo_grpc.kv import shm
    from dynamo_grpc.kv.handle_key import KvKey

    key = KvKey.generate()
    store = LeasedKvStore(endpoint="e", host="h", ttl_s=30, key=key)
    segment = shm.new_segment_name()
    data = os.urandom(4096) + os.urandom(4096)
    shm.create(segment, len(data)).write(data)
    shards = [pb.KvShard(rank=r, first_kv_head=r, num_kv_heads=1) for r in (0, 1)]
    handle = await store.hold_segment(segment, num_tokens=1, layout=pb.KvLayout(), fingerprint="f", shards=shards)
    assert handle.crc32 == zlib.crc32(data) and handle.total_bytes == len(data)
    assert [(s.rank, s.first_kv_head, s.offset, s.size, s.crc32) for s in handle.shards] == [
        (0, 0, 0, 4096, zlib.crc32(data[:4096])), (1, 1, 4096, 4096, zlib.crc32(data[4096:]))]
    key.verify(handle, request_id="r")  # signed with its shards
    assert store.release(handle.transfer_id, handle.pull_token)
    shm.wait_released()  # freed pages go on a thread of their own
    assert shm.size_of(segment) is None


async def test_a_puller_at_another_tensor_parallel_size_is_told_so() -> None:
    store = LeasedKvStore(endpoint="e", host="h", ttl_s=30)
    fingerprint = "vllm-0.32.0/tiny/float32/kv-float32/bs32/L4xH2xD64"
    handle = store.hold(data=b"kv", num_tokens=1, layout=pb.KvLayout(), fingerprint=fingerprint + "/tp2h1")
    with pytest.raises(FailedPrecondition, match=r"tensor parallelism only \(tp2h1 vs tp1h2\)") as refusal:
        store.claim(handle.transfer_id, handle.pull_token, fingerprint + "/tp1h2")
    assert refusal.value.reason == "ENGINE_FINGERPRINT_MISMATCH"
    with pytest.raises(FailedPrecondition, match="Pair only workers with the same engine fingerprint"):
        store.claim(handle.transfer_id, handle.pull_token,
                    "vllm-0.32.0/other/float32/kv-float32/bs32/L4xH2xD64/tp2h1")
