"""Saving and loading KV blocks between a GPU's paged cache and shared memory, against plain copies.

The shared-memory path on a GPU host is: prefill engine's cache -> segment (device to host), then the
segment -> decode engine's cache (host to device). This prints each against a contiguous copy of the
same bytes between the device and pageable host memory, side by side in one run, for vLLM's GPU
FlashAttention layout ([2 (K, V), blocks, block size, kv heads, head size] per layer).

    python bench/kv_blocks_device.py --tokens 1024 --repeat 5     # needs a CUDA device
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import torch

from dynamo_grpc.engine.kv_blocks import block_major, load_blocks, save_blocks
from dynamo_grpc.kv import shm

# Llama-3-8B: 32 layers, 8 KV heads of 128, bfloat16 = 128 KiB per token.
LAYERS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16


def timed(step, repeat: int) -> float:
    """Median seconds of `step`, after one warm-up."""
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--cache-blocks", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures device<->host block copies")
    num = args.tokens // BLOCK_SIZE
    shape = (2, args.cache_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    source = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    target = [torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    views_in = [v for layer in source for v in block_major(layer, args.cache_blocks)]
    views_out = [v for layer in target for v in block_major(layer, args.cache_blocks)]
    gen = torch.Generator().manual_seed(0)
    save_ids = torch.randperm(args.cache_blocks, generator=gen)[:num].tolist()
    load_ids = torch.randperm(args.cache_blocks, generator=gen)[:num].tolist()
    nbytes = 2 * LAYERS * num * BLOCK_SIZE * KV_HEADS * HEAD_SIZE * 2
    segment = f"dynamo-grpc-bench-{uuid.uuid4().hex}"

    def save() -> None:
        shm.unlink(segment)
        save_blocks(views_in, save_ids, segment)

    try:
        save_s = timed(save, args.repeat)
        load_s = timed(lambda: load_blocks(views_out, load_ids, segment), args.repeat)
        for layer_in, layer_out in zip(source, target, strict=True):
            assert torch.equal(layer_out[:, load_ids], layer_in[:, save_ids]), "blocks arrived wrong"
    finally:
        shm.unlink(segment)
    flat = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    host = torch.empty_like(flat, device="cpu")
    d2h_s = timed(lambda: host.copy_(flat), args.repeat)
    h2d_s = timed(lambda: flat.copy_(host), args.repeat)

    gbps = lambda s: nbytes / s / 1e9  # noqa: E731
    print(f"{torch.cuda.get_device_name()}: {args.tokens} tokens of Llama-3-8B KV = {nbytes / 2**20:.0f} MiB "
          f"in {num} blocks of {args.cache_blocks}, median of {args.repeat}")
    print(f"save  cache -> segment  {gbps(save_s):6.2f} GB/s   contiguous device->host {gbps(d2h_s):6.2f} GB/s"
          f"   ratio {d2h_s / save_s:.2f}")
    print(f"load  segment -> cache  {gbps(load_s):6.2f} GB/s   contiguous host->device {gbps(h2d_s):6.2f} GB/s"
          f"   ratio {h2d_s / load_s:.2f}")


if __name__ == "__main__":
    main()
