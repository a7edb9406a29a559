"""KV transfer throughput of the gRPC path vs a raw loopback socket copy vs memcpy, side by side.

Each pull moves the same bytes: a prefill worker process holds them in its leased store and serves
KvTransferService; this process pulls them with the decode side's `KvPuller` (chunk stream, size and
CRC-32 check). The raw socket sender is also another process. Ratios are taken within one run.

    python bench/kv_transfer.py --mib 64 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time

import numpy as np

from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.kv_client import KvPuller
from dynamo_grpc.kv_store import LeasedKvStore
from dynamo_grpc.kv_transfer_service import KvTransferServicer
from dynamo_grpc.server import ServiceBinding, start_server
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc


def payload(nbytes: int) -> bytes:
    return np.random.default_rng(0).bytes(nbytes)


def grpc_holder(nbytes: int, count: int, handles: mp.Queue, chunk_bytes: int) -> None:
    """Prefill side: hold `count` copies of the payload and serve them until killed."""
    async def main() -> None:
        store = LeasedKvStore(endpoint="", host="bench", ttl_s=600)
        server = await start_server([ServiceBinding(KvTransferServicer(store, chunk_bytes=chunk_bytes),
                                                    kv_grpc.add_KvTransferServiceServicer_to_server,
                                                    kv_pb.DESCRIPTOR.services_by_name["KvTransferService"].full_name)],
                                    host="127.0.0.1", port=0)
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


def socket_receive(port: int, nbytes: int) -> float:
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], min(nbytes - got, 4 << 20))
            if n == 0:
                raise ConnectionError("sender closed early")
            got += n
    return time.perf_counter() - started


async def grpc_pulls(handles: list[pb.KvHandle]) -> list[float]:
    channels = ChannelPool()
    puller = KvPuller(channels, fingerprint="bench")
    times = []
    for i, handle in enumerate(handles):
        started = time.perf_counter()
        await puller.pull(handle, request_id=f"bench-{i}")
        times.append(time.perf_counter() - started)
        await puller.release(handle, request_id=f"bench-{i}")
    await channels.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="bytes per transfer, in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="transfers per path (the median is reported)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="gRPC chunk size in KiB")
    args = parser.parse_args()
    nbytes, count = args.mib << 20, args.repeat + 1  # one warm-up each

    data = payload(nbytes)
    memcpy = []
    for _ in range(count):
        started = time.perf_counter()
        copy = bytearray(data)
        memcpy.append(time.perf_counter() - started)
    del copy

    ctx = mp.get_context("spawn")
    port_q: mp.Queue = ctx.Queue()
    sender = ctx.Process(target=socket_sender, args=(nbytes, count, port_q), daemon=True)
    sender.start()
    port = port_q.get(timeout=60)
    raw = [socket_receive(port, nbytes) for _ in range(count)]
    sender.join(10)

    handle_q: mp.Queue = ctx.Queue()
    holder = ctx.Process(target=grpc_holder, args=(nbytes, count, handle_q, args.chunk_kib << 10), daemon=True)
    holder.start()
    handles = [pb.KvHandle.FromString(handle_q.get(timeout=120)) for _ in range(count)]
    grpc_times = asyncio.run(grpc_pulls(handles))
    holder.kill()

    def gbps(times: list[float]) -> float:
        return nbytes / statistics.median(times[1:]) / 1e9

    results = {"memcpy": gbps(memcpy), "raw loopback socket": gbps(raw), "gRPC PullKv (+CRC-32)": gbps(grpc_times)}
    print(f"KV transfer of {args.mib} MiB, median of {args.repeat} (after 1 warm-up), {os.cpu_count()} CPUs")
    for name, rate in results.items():
        print(f"  {name:<24} {rate:7.2f} GB/s")
    print(f"  ratio gRPC / raw socket: {results['gRPC PullKv (+CRC-32)'] / results['raw loopback socket']:.2f}")
    print(f"  ratio gRPC / memcpy:     {results['gRPC PullKv (+CRC-32)'] / results['memcpy']:.2f}")


if __name__ == "__main__":
    main()
