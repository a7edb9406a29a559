"""Whole-block KV copies between paged caches and shared memory (no engine needed)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

from dynamo_grpc.engine.kv_blocks import Shard, block_bytes, block_major, load_blocks, save_blocks
from dynamo_grpc.kv import shm

# The copies run on every device this machine has: a GPU machine also checks the device<->host branches.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def caches(fill: bool, device: str = "cpu") -> list[torch.Tensor]:
    """Two layers shaped like vLLM-CPU's: [blocks, kv heads, block size, 2 x head size]."""
    make = torch.randn if fill else torch.zeros
    return [make(8, 2, 4, 6, dtype=torch.float32, device=device) for _ in range(2)]


@pytest.fixture
def segment() -> Iterator[str]:
    name = f"dynamo-grpc-test-{uuid.uuid4().hex}"
    yield name
    shm.unlink(name)


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_land_where_asked_and_nowhere_else(segment: str, device: str) -> None:
    source, target = caches(True, device), caches(False, device)
    save_blocks(source, [5, 1, 6], segment)
    assert shm.size_of(segment) == 3 * block_bytes(source) == 3 * 2 * (2 * 4 * 6 * 4)
    # Skip the first saved block (as a decode engine does when it already caches a prefix).
    load_blocks(target, [0, 7], segment, first=1)
    for src, dst in zip(source, target):
        assert torch.equal(dst[0], src[1]) and torch.equal(dst[7], src[6])
        assert not dst[1:7].any()


@pytest.mark.parametrize("device", DEVICES)
def test_each_tensor_parallel_rank_moves_its_own_shard_of_one_segment(segment: str, device: str) -> None:
    """Two ranks (each with half the KV heads) write one segment; each reads back its own half only."""
    sources = [caches(True, device) for _ in range(2)]
    for rank in (1, 0):  # the ranks run side by side: either may create the segment
        save_blocks(sources[rank], [5, 1], segment, Shard(rank, 2))
    shard_bytes = 2 * block_bytes(sources[0])
    assert shm.size_of(segment) == 2 * shard_bytes
    for rank in (0, 1):
        target = caches(False, device)
        load_blocks(target, [3, 4], segment, shard=Shard(rank, 2))
        for src, dst in zip(sources[rank], target):
            assert torch.equal(dst[3], src[5]) and torch.equal(dst[4], src[1])
            assert not dst[:3].any() and not dst[5:].any()
    with pytest.raises(ValueError, match="5 equal shards"):
        load_blocks(caches(False, device), [0], segment, shard=Shard(0, 5))


def test_a_segment_of_the_wrong_shape_is_refused(segment: str) -> None:
    save_blocks(caches(True), [0, 1], segment)
    with pytest.raises(ValueError, match="asked for"):
        load_blocks(caches(False), [0, 1, 2], segment)
    other = [torch.zeros(8, 3, 4, 6) for _ in range(2)]
    with pytest.raises(ValueError, match="whole number"):
        load_blocks(other, [0], segment)


def test_segments_of_dead_processes_are_swept() -> None:
    prefix = f"dynamo-grpc-test-{uuid.uuid4().hex[:8]}-"
    dead, alive = f"{prefix}999999999-a", f"{prefix}1-b"  # pid 1 always exists
    for name in (dead, alive):
        shm.create(name, 16).close()
    try:
        assert shm.sweep(prefix) == 1
        assert shm.size_of(dead) is None and shm.size_of(alive) == 16
    finally:
        shm.unlink(alive)


@pytest.mark.parametrize("device", DEVICES)
def test_a_kv_first_layout_moves_as_two_block_major_views(segment: str, device: str) -> None:
    # vLLM's GPU FlashAttention layout: [2 (K, V), blocks, block size, kv heads, head size].
    source = torch.randn(2, 8, 4, 2, 6, device=device)
    target = torch.zeros_like(source)
    save_blocks(block_major(source, 8), [3, 4], segment)
    load_blocks(block_major(target, 8), [6, 0], segment)
    assert torch.equal(target[:, 6], source[:, 3]) and torch.equal(target[:, 0], source[:, 4])
    assert not target[:, 1:6].any() and not target[:, 7].any()
    assert shm.size_of(segment) == 2 * 2 * (4 * 2 * 6 * 4)


def test_a_layout_without_a_block_dimension_is_refused() -> None:
    assert len(block_major(torch.zeros(8, 2, 4), 8)) == 1
    with pytest.raises(ValueError, match="neither"):
        block_major(torch.zeros(3, 8, 4), 8)


def test_kv_heads_split_across_ranks_as_vllm_splits_them() -> None:
    from dynamo_grpc.engine.vllm_engine import kv_shards

    heads = [(s.rank, s.first_kv_head, s.num_kv_heads) for s in kv_shards(2, 8, 4)]
    assert heads == [(0, 0, 4), (1, 4, 4)]
    # Two KV heads over four ranks: each head on two ranks.
    assert [s.first_kv_head for s in kv_shards(4, 2, 1)] == [0, 0, 1, 1]
