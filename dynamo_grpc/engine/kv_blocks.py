"""Copying whole KV blocks between an engine's paged cache and a shared-memory segment.

A segment holds one shard per tensor-parallel rank, rank 0 first, all of one size; a shard is
layer-major, then block, each block byte-for-byte as the rank's engine stores it (dimension 0 of every
layer's cache indexes blocks). Each rank writes and reads its own shard only. Copying whole blocks keeps
this independent of how an attention backend lays out heads and tokens inside a block; engines with the
same fingerprint agree.

A cache in host memory moves through the segment's file (`os.preadv`/`os.pwritev` of the cache's block
rows, on a few threads): the kernel copies straight between the cache and the segment's pages, and no
mapping of the segment has to be built page by page first, which costs more than the copy. A cache on
a GPU goes through a mapping of the segment (and pinned staging for saves).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from dynamo_grpc.kv import shm


def block_major(cache: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
    """One layer's cache as views with blocks in dimension 0.

    vLLM-CPU puts blocks first; vLLM's GPU FlashAttention layout puts K and V first ([2, blocks, ...]),
    which becomes two views, K then V. Any other layout is refused rather than copied wrongly.
    """
    if cache.shape[0] == num_blocks:
        return [cache]
    if cache.dim() > 1 and cache.shape[0] == 2 and cache.shape[1] == num_blocks:
        return list(cache.unbind(0))
    raise ValueError(f"KV cache of shape {tuple(cache.shape)} has its {num_blocks} blocks in neither "
                     f"dimension 0 nor, after K/V, dimension 1")


def block_bytes(caches: Sequence[torch.Tensor]) -> int:
    """Bytes of one block across all layers."""
    return sum(math.prod(c.shape[1:]) * c.element_size() for c in caches)


@dataclass(frozen=True)
class Shard:
    """Which of a segment's equal shards a rank owns: rank `rank` of `num_ranks`."""

    rank: int = 0
    num_ranks: int = 1


def save_blocks(caches: Sequence[torch.Tensor], block_ids: Sequence[int], segment: str,
                shard: Shard = Shard()) -> None:
    """Write blocks `block_ids` of every layer into the rank's shard of a new segment (its other ranks
    write theirs into the same segment)."""
    shard_bytes = block_bytes(caches) * len(block_ids)
    size, base = shard_bytes * shard.num_ranks, shard_bytes * shard.rank
    if _rows_movable(caches):
        fd = shm.create_file(segment, size, shared=shard.num_ranks > 1)
        try:
            _move_rows(caches, block_ids, 0, len(block_ids), fd, os.pwritev, base)
        except BaseException:
            shm.unlink(segment)
            raise
        finally:
            os.close(fd)
        return
    mapping = shm.create(segment, size, shared=shard.num_ranks > 1)
    try:
        _copy_out(caches, block_ids, memoryview(mapping)[base:base + shard_bytes])
    finally:
        mapping.close()  # the tensor views over it died with _copy_out


def load_blocks(caches: Sequence[torch.Tensor], block_ids: Sequence[int], segment: str, first: int = 0,
                shard: Shard = Shard()) -> None:
    """Read the blocks `first`, `first + 1`, ... of the rank's shard into the cache's blocks `block_ids`."""
    if _rows_movable(caches):
        fd = os.open(shm.SHM_DIR / segment, os.O_RDONLY)
        try:
            shard_bytes = _shard_bytes(os.fstat(fd).st_size, shard)
            segment_blocks = _whole_blocks(caches, shard_bytes)
            if first + len(block_ids) > segment_blocks:
                raise ValueError(f"segment has {segment_blocks} blocks, asked for "
                                 f"{first}..{first + len(block_ids) - 1}")
            _move_rows(caches, block_ids, first, segment_blocks, fd, os.preadv, shard_bytes * shard.rank)
        finally:
            os.close(fd)
        return
    mapping = shm.attach(segment)
    try:
        shard_bytes = _shard_bytes(len(mapping), shard)
        _copy_in(caches, block_ids, memoryview(mapping)[shard_bytes * shard.rank:][:shard_bytes], first)
    finally:
        mapping.close()


def _shard_bytes(total: int, shard: Shard) -> int:
    if total % shard.num_ranks:
        raise ValueError(f"segment of {total} bytes does not split into {shard.num_ranks} equal shards")
    return total // shard.num_ranks


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_io_threads: ThreadPoolExecutor | None = None


def _rows_movable(caches: Sequence[torch.Tensor]) -> bool:
    """Host caches whose blocks are contiguous rows move through the segment's file."""
    return hasattr(os, "preadv") and all(c.device.type == "cpu" and c.is_contiguous() for c in caches)


def _whole_blocks(caches: Sequence[torch.Tensor], total: int) -> int:
    if total % block_bytes(caches):
        raise ValueError(f"segment of {total} bytes is not a whole number of {block_bytes(caches)}-byte blocks")
    return total // block_bytes(caches)


def _move_rows(caches: Sequence[torch.Tensor], block_ids: Sequence[int], first: int, segment_blocks: int,
               fd: int, move: Callable[[int, list[memoryview], int], int], base: int = 0) -> None:
    """`os.preadv` or `os.pwritev` between the caches' rows `block_ids` and the blocks `first`, ... of the
    shard at byte `base`, whose layers each hold `segment_blocks` blocks; the layers' batches run on a few
    threads."""
    batches, layer_offset = [], base
    for cache in caches:
        row_bytes = math.prod(cache.shape[1:]) * cache.element_size()
        offset = layer_offset + first * row_bytes
        runs = _row_runs(cache, block_ids)
        for start in range(0, len(runs), _IOV_MAX):
            batch = runs[start:start + _IOV_MAX]
            batches.append((batch, offset, sum(run.nbytes for run in batch)))
            offset += batches[-1][2]
        layer_offset += segment_blocks * row_bytes

    def run(batch: tuple[list[memoryview], int, int]) -> None:
        views, offset, nbytes = batch
        if move(fd, views, offset) != nbytes:
            raise OSError(f"moved fewer than the {nbytes} bytes asked at offset {offset} of the segment")

    for _ in _threads().map(run, batches):
        pass


def _row_runs(cache: torch.Tensor, block_ids: Sequence[int]) -> list[memoryview]:
    """The cache's rows `block_ids` as writable buffers, one per run of consecutive ids, in order."""
    rows = cache.view(torch.uint8).reshape(cache.shape[0], -1).numpy()  # numpy has no bfloat16; bytes suffice
    runs, start = [], 0
    for i in range(1, len(block_ids) + 1):
        if i == len(block_ids) or block_ids[i] != block_ids[i - 1] + 1:
            runs.append(memoryview(rows[block_ids[start]:block_ids[i - 1] + 1]))
            start = i
    return runs


def _threads() -> ThreadPoolExecutor:
    """Kernel copies of different layers side by side (the calls release the GIL)."""
    global _io_threads
    if _io_threads is None:
        _io_threads = ThreadPoolExecutor(max(1, min(torch.get_num_threads(), 4)),
                                         thread_name_prefix="kv-blocks")
    return _io_threads


def _layer_views(caches: Sequence[torch.Tensor], buffer: Any) -> list[torch.Tensor]:
    """Per layer, a tensor over the buffer shaped like that layer's blocks."""
    num_blocks = _whole_blocks(caches, len(buffer))
    with warnings.catch_warnings():  # a read-only segment: only ever copied from
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        flat = torch.frombuffer(buffer, dtype=torch.uint8)
    views, offset = [], 0
    for cache in caches:
        shape = (num_blocks, *cache.shape[1:])
        size = math.prod(shape) * cache.element_size()
        views.append(flat[offset:offset + size].view(cache.dtype).view(shape))
        offset += size
    return views


def _copy_out(caches: Sequence[torch.Tensor], block_ids: Sequence[int], buffer: Any) -> None:
    ids = torch.tensor(block_ids, dtype=torch.long)
    views = _layer_views(caches, buffer)
    if caches[0].device.type == "cpu":
        for cache, view in zip(caches, views, strict=True):
            torch.index_select(cache, 0, ids, out=view)
        return
    # Device copies straight into the segment's pageable memory saved 128 MiB at 1.2 GB/s on an H100;
    # through a pinned staging buffer the same save runs at 2.7 GB/s (bench/kv_blocks_device.py).
    staged = _pinned_staging(len(buffer))
    offset = 0
    for cache, view in zip(caches, views, strict=True):
        size = view.numel() * view.element_size()
        staged[offset:offset + size].view(cache.dtype).view(view.shape).copy_(
            cache.index_select(0, ids.to(cache.device)), non_blocking=True)
        offset += size
    torch.cuda.current_stream(caches[0].device).synchronize()
    torch.frombuffer(buffer, dtype=torch.uint8).copy_(staged[:offset])


_staging: torch.Tensor | None = None


def _pinned_staging(nbytes: int) -> torch.Tensor:
    """Page-locked host memory for device-to-host copies, kept and grown to the largest save seen."""
    global _staging
    if _staging is None or _staging.numel() < nbytes:
        _staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return _staging


def _copy_in(caches: Sequence[torch.Tensor], block_ids: Sequence[int], buffer: Any, first: int) -> None:
    ids = torch.tensor(block_ids, dtype=torch.long)
    for cache, view in zip(caches, _layer_views(caches, buffer), strict=True):
        if first + len(ids) > len(view):
            raise ValueError(f"segment has {len(view)} blocks, asked for {first}..{first + len(ids) - 1}")
        cache.index_copy_(0, ids.to(cache.device), view[first:first + len(ids)].to(cache.device))
