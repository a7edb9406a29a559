"""KV transfer throughput of both paths against their raw references, side by side in one run.

Every transfer starts from KV a prefill worker holds and ends in memory of the decode side:
- gRPC: a prefill worker process holds the bytes in its leased store and serves KvTransferService;
  this process pulls them with the decode side's gRPC transport (chunk stream, size and CRC-32 checks).
  Reference: the same bytes over a raw loopback TCP socket from another process.
- shm (same host): the decode side links the held segment under its own name and copies its blocks
  into a paged KV cache (`kv_blocks.load_blocks`, what our vLLM connector runs). Reference: memcpy
  of the same bytes. Saving blocks into the segment, the prefill side's part, is printed apart.
Receive buffers and caches exist before the clock starts, for every path and reference alike.

    python bench/kv_transfer.py --mib 64 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import socket
import statistics
import time
import uuid

import torch

from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.engine.kv_blocks import load_blocks, save_blocks
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import GrpcTransport
from dynamo_grpc.kv.wire import SERVICE, add_kv_transfer_service
from dynamo_grpc.services.kv_transfer_service import KvTransferServicer
from dynamo_grpc.services.server import ServiceBinding, start_server
from dynamo_grpc.v1 import common_pb2 as pb


def payload(nbytes: int) -> bytes:
    return random.Random(0).randbytes(nbytes)


def grpc_holder(nbytes: int, count: int, handles: mp.Queue, chunk_bytes: int) -> None:
    """Prefill side: hold `count` copies of the payload and serve them until killed."""
    async def main() -> None:
        store = LeasedKvStore(endpoint="", host="bench", ttl_s=600)
        server = await start_server([ServiceBinding(KvTransferServicer(store, chunk_bytes=chunk_bytes),
                                                    add_kv_transfer_service, SERVICE)], host="127.0.0.1", port=0)
        store.endpoint = f"127.0.0.1:{server.port}"
        data = payload(nbytes)
        for _ in range(count):
            handles.put(store.hold(data=data, num_tokens=1, layout=pb.KvLayout(), fingerprint="bench")
                        .SerializeToString())
        await asyncio.Event().wait()

    asyncio.run(main())


def socket_sender(nbytes: int, count: int, port: mp.Queue) -> None:
    data = payload(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port.put(server.getsockname()[1])
        for _ in range(count):
            conn, _ = server.accept()
            with conn:
                conn.sendall(data)


def socket_receive(port: int, buffer: bytearray) -> float:
    nbytes = len(buffer)
    started = time.perf_counter()
    with memoryview(buffer) as view, socket.create_connection(("127.0.0.1", port)) as conn:
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], min(nbytes - got, 4 << 20))
            if n == 0:
                raise ConnectionError("sender closed early")
            got += n
    return time.perf_counter() - started


async def grpc_pulls(handles: list[pb.KvHandle], buffer: bytearray) -> list[float]:
    channels = ChannelPool()
    puller = GrpcTransport(channels)
    times = []
    for i, handle in enumerate(handles):
        started = time.perf_counter()
        await puller.pull(handle, fingerprint="bench", request_id=f"bench-{i}", into=lambda size: buffer)
        times.append(time.perf_counter() - started)
        await puller.release(handle, request_id=f"bench-{i}")
    await channels.close()
    return times


def shm_moves(nbytes: int, count: int) -> tuple[list[float], list[float]]:
    """(save times, take times) for a paged cache shaped like a 4-layer model with 128 KiB blocks."""
    num_blocks = nbytes // (128 << 10)
    source, target = ([torch.randn(2 * num_blocks, 2, 32, 128) for _ in range(4)] for _ in range(2))
    saves, takes = [], []
    for i in range(count):
        held, taken = f"dynamo-grpc-bench-{os.getpid()}-{uuid.uuid4().hex}", f"dynamo-grpc-bench-{os.getpid()}-{i}"
        blocks = torch.randperm(2 * num_blocks)[:num_blocks].tolist()
        started = time.perf_counter()
        save_blocks(source, blocks, held)
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        shm.link(held, taken)
        shm.unlink(held)
        load_blocks(target, blocks, taken)
        shm.unlink(taken)
        takes.append(time.perf_counter() - started)
        assert all(torch.equal(s[blocks], t[blocks]) for s, t in zip(source, target))
    return saves, takes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="bytes per transfer, in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="transfers per path (the median is reported)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="gRPC chunk size in KiB")
    args = parser.parse_args()
    nbytes, count = args.mib << 20, args.repeat + 1  # one warm-up each
    data, buffer = payload(nbytes), bytearray(nbytes)  # zero-filled, so already faulted in

    memcpy = []
    source, target = torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.frombuffer(buffer, dtype=torch.uint8)
    for _ in range(count):
        started = time.perf_counter()
        target.copy_(source)  # torch's copy: the same kernels, and threads, the cache copies use
        memcpy.append(time.perf_counter() - started)
    del source, target
    saves, takes = shm_moves(nbytes, count)

    ctx = mp.get_context("spawn")
    port_q: mp.Queue = ctx.Queue()
    sender = ctx.Process(target=socket_sender, args=(nbytes, count, port_q), daemon=True)
    sender.start()
    port = port_q.get(timeout=60)
    raw = [socket_receive(port, buffer) for _ in range(count)]
    sender.join(10)

    handle_q: mp.Queue = ctx.Queue()
    holder = ctx.Process(target=grpc_holder, args=(nbytes, count, handle_q, args.chunk_kib << 10), daemon=True)
    holder.start()
    handles = [pb.KvHandle.FromString(handle_q.get(timeout=120)) for _ in range(count)]
    grpc_times = asyncio.run(grpc_pulls(handles, buffer))
    holder.kill()

    def gbps(times: list[float]) -> float:
        return nbytes / statistics.median(times[1:]) / 1e9

    rates = {name: gbps(times) for name, times in (("memcpy", memcpy), ("shm", takes), ("save", saves),
                                                   ("raw", raw), ("grpc", grpc_times))}
    print(f"KV transfer of {args.mib} MiB, median of {args.repeat} (after 1 warm-up), {os.cpu_count()} CPUs, "
          f"gRPC chunks of {args.chunk_kib} KiB")
    print(f"  memcpy (torch copy_, existing buffer)  {rates['memcpy']:7.2f} GB/s")
    print(f"  shm: link + copy blocks into cache      {rates['shm']:7.2f} GB/s")
    print(f"  (prefill side: save blocks to segment   {rates['save']:7.2f} GB/s)")
    print(f"  raw loopback socket                    {rates['raw']:7.2f} GB/s")
    print(f"  gRPC PullKv (+CRC-32)                  {rates['grpc']:7.2f} GB/s")
    print(f"  shm/memcpy = {rates['shm'] / rates['memcpy']:.2f}   (target >= 0.50)")
    print(f"  grpc/raw   = {rates['grpc'] / rates['raw']:.2f}   (target >= 0.50)")
    print(f"  grpc/memcpy = {rates['grpc'] / rates['memcpy']:.2f}")


if __name__ == "__main__":
    main()
