"""KV transfer throughput of every transport against its raw reference, side by side in one run.

Every transfer starts from KV a prefill worker holds and ends in memory of the decode side:
- memcpy: torch's copy between two existing buffers (the same kernels and threads the cache copies use).
- shm (same host): the decode side links the held segment under its own name and copies its blocks into a
  paged KV cache (`kv_blocks.load_blocks`, what our vLLM connector runs). Reference: memcpy. Saving the
  blocks into the segment, the prefill side's part, is printed apart. `--huge-shm-dir` adds both rows for
  segments in a tmpfs mounted with `huge=always` (what `DYNAMO_GRPC_SHM_DIR` selects).
- raw socket: the same bytes over a loopback TCP socket from another process, into an existing buffer.
- gRPC: a prefill worker process holds the bytes in its leased store and serves KvTransferService; this
  process pulls them with the decode side's transport (ranged PullKv streams, CRC-32 checked), with 1
  stream and with N. Reference: the raw socket.
- nixl: the holder's NIXL agent registered the bytes; this process's agent READs them into its own
  registered buffer, with UCX's default transports and with `UCX_TLS=tcp`.
Receive buffers and caches exist before the clock starts, for every path and reference alike.

    python bench/kv_transfer.py --mib 64 384 --repeat 5
    mount -t tmpfs -o huge=always,size=4g tmpfs /mnt/huge-shm   # root; then --huge-shm-dir /mnt/huge-shm
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.engine.kv_blocks import load_blocks, save_blocks
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.nixl_transport import NixlAgent, nixl_installed
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.kv.transport import DEFAULT_PULL_STREAMS, GrpcTransport, release_over_grpc
from dynamo_grpc.kv.wire import SERVICE, add_kv_transfer_service
from dynamo_grpc.services.kv_transfer_service import DEFAULT_CHUNK_BYTES, KvTransferServicer
from dynamo_grpc.services.server import ServiceBinding, start_server
from dynamo_grpc.v1 import common_pb2 as pb


def payload(nbytes: int) -> bytes:
    return np.random.default_rng(0).bytes(nbytes)


def holder(nbytes: int, chunk_bytes: int, ucx_tls: str, handles: mp.Queue) -> None:
    """Prefill side: hold the payload (registered with a NIXL agent when nixl is installed) and serve it
    until killed."""
    if ucx_tls:
        os.environ["UCX_TLS"] = ucx_tls

    async def main() -> None:
        store = LeasedKvStore(endpoint="", host="bench", ttl_s=3600,
                              nixl=NixlAgent() if nixl_installed() else None)
        server = await start_server([ServiceBinding(KvTransferServicer(store, chunk_bytes=chunk_bytes),
                                                    add_kv_transfer_service, SERVICE)], host="127.0.0.1", port=0)
        store.endpoint = f"127.0.0.1:{server.port}"
        handles.put(store.hold(data=payload(nbytes), num_tokens=1, layout=pb.KvLayout(), fingerprint="bench")
                    .SerializeToString())
        await asyncio.Event().wait()

    asyncio.run(main())


def start_holder(nbytes: int, chunk_bytes: int, ucx_tls: str = "") -> tuple[mp.Process, pb.KvHandle]:
    ctx = mp.get_context("spawn")
    handles: mp.Queue = ctx.Queue()
    process = ctx.Process(target=holder, args=(nbytes, chunk_bytes, ucx_tls, handles), daemon=True)
    process.start()
    return process, pb.KvHandle.FromString(handles.get(timeout=300))


def socket_sender(nbytes: int, count: int, port: mp.Queue) -> None:
    data = payload(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port.put(server.getsockname()[1])
        for _ in range(count):
            conn, _ = server.accept()
            with conn:
                conn.sendall(data)


def raw_socket(nbytes: int, count: int, buffer: bytearray) -> list[float]:
    ctx = mp.get_context("spawn")
    port_q: mp.Queue = ctx.Queue()
    sender = ctx.Process(target=socket_sender, args=(nbytes, count, port_q), daemon=True)
    sender.start()
    port = port_q.get(timeout=120)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with memoryview(buffer) as view, socket.create_connection(("127.0.0.1", port)) as conn:
            got = 0
            while got < nbytes:
                n = conn.recv_into(view[got:], min(nbytes - got, 4 << 20))
                if n == 0:
                    raise ConnectionError("sender closed early")
                got += n
        times.append(time.perf_counter() - started)
    sender.join(10)
    return times


def grpc_pulls(handle: pb.KvHandle, count: int, streams: int, buffer: bytearray) -> list[float]:
    view = memoryview(buffer)

    def write(offset: int, data: memoryview) -> None:
        view[offset:offset + len(data)] = data

    async def pulls() -> list[float]:
        channels = ChannelPool()
        puller = GrpcTransport(channels, streams=streams)
        times = []
        for i in range(count):
            started = time.perf_counter()
            await puller.pull(handle, fingerprint="bench", request_id=f"bench-{i}", write=write)
            times.append(time.perf_counter() - started)
        await channels.close()
        return times

    return asyncio.run(pulls())


def nixl_reads(handle: pb.KvHandle, count: int, buffer: bytearray, ucx_tls: str) -> list[float]:
    """READs of the held bytes by an agent made under `ucx_tls`; the last one releases the transfer."""
    saved = os.environ.get("UCX_TLS")
    if ucx_tls:
        os.environ["UCX_TLS"] = ucx_tls
    try:
        agent = NixlAgent()
    finally:
        if saved is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved
    into = agent.register(buffer)

    async def reads() -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await agent.read(handle.nixl, into)
            times.append(time.perf_counter() - started)
        channels = ChannelPool()
        await release_over_grpc(channels, handle, request_id="bench")
        await channels.close()
        return times

    try:
        return asyncio.run(reads())
    finally:
        agent.deregister(into)


def memcpy(nbytes: int, count: int) -> list[float]:
    source, target = torch.full((nbytes,), 1, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - started)
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
        shm.release_soon(taken)  # as a decode worker does: freeing the pages is off the request's path
        takes.append(time.perf_counter() - started)
        shm.wait_released()
        assert all(torch.equal(s[blocks], t[blocks]) for s, t in zip(source, target))
    del source, target
    return saves, takes


def measure(nbytes: int, count: int, streams: list[int], chunk_bytes: int,
            huge_shm_dir: str) -> dict[str, list[float]]:
    """Seconds per transfer of every path, the slow ones once fewer times."""
    buffer = bytearray(nbytes)  # zero-filled, so already faulted in
    times: dict[str, list[float]] = {"memcpy": memcpy(nbytes, count)}
    times["save"], times["shm"] = shm_moves(nbytes, count)
    if huge_shm_dir:
        shm_dir, shm.SHM_DIR = shm.SHM_DIR, Path(huge_shm_dir)
        try:
            times["save, huge pages"], times["shm, huge pages"] = shm_moves(nbytes, count)
        finally:
            shm.SHM_DIR = shm_dir
    times["raw socket"] = raw_socket(nbytes, count, buffer)
    holder_process, handle = start_holder(nbytes, chunk_bytes)
    try:
        times["grpc, 1 stream"] = grpc_pulls(handle, count, 1, buffer)
        for n in streams:
            times[f"grpc, {n} streams"] = grpc_pulls(handle, count, n, buffer)
        if handle.HasField("nixl"):
            times["nixl"] = nixl_reads(handle, count, buffer, "")
    finally:
        holder_process.kill()
    if nixl_installed():
        holder_process, handle = start_holder(nbytes, chunk_bytes, ucx_tls="tcp")
        try:
            times["nixl, UCX_TLS=tcp"] = nixl_reads(handle, max(2, count // 2), buffer, "tcp")
        finally:
            holder_process.kill()
    return times


def chunk_sweep(nbytes: int, count: int, streams: int, chunks_kib: list[int]) -> dict[int, list[float]]:
    """N-stream pulls (N the first of `--streams`) from holders serving chunks of each size."""
    results = {}
    buffer = bytearray(nbytes)
    for kib in chunks_kib:
        holder_process, handle = start_holder(nbytes, kib << 10)
        try:
            results[kib] = grpc_pulls(handle, count, streams, buffer)
        finally:
            holder_process.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 384], help="bytes per transfer, in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="transfers per path (the median is reported)")
    parser.add_argument("--streams", type=int, nargs="+", default=[4],
                        help="parallel PullKv streams of the N-stream rows (one row each; decode workers "
                        f"here use {DEFAULT_PULL_STREAMS})")
    parser.add_argument("--chunk-kib", type=int, default=DEFAULT_CHUNK_BYTES >> 10, help="gRPC chunk size")
    parser.add_argument("--sweep-chunk-kib", type=int, nargs="*", default=[],
                        help="also time N-stream gRPC pulls at each of these chunk sizes")
    parser.add_argument("--huge-shm-dir", default="", help="also time shm in this tmpfs (mounted huge=always)")
    args = parser.parse_args()
    count = args.repeat + 1  # one warm-up each
    print(f"KV transfer, median of {args.repeat} after 1 warm-up; {os.cpu_count()} CPUs, gRPC chunks of "
          f"{args.chunk_kib} KiB" + ("" if nixl_installed() else "; nixl not installed"))
    for mib in args.mib:
        nbytes = mib << 20

        def gbps(times: list[float]) -> float:
            return nbytes / statistics.median(times[1:]) / 1e9

        measured = measure(nbytes, count, args.streams, args.chunk_kib << 10, args.huge_shm_dir)
        rates = {name: gbps(times) for name, times in measured.items()}
        print(f"\n{mib} MiB")
        reference: Callable[[str], str] = lambda name: "memcpy" if name.startswith(("shm", "save")) else "raw socket"
        for name, rate in rates.items():
            ref = reference(name)
            ratio = f"{rate / rates[ref]:5.2f} x {ref}" if name not in ("memcpy", "raw socket") else ""
            label = f"(prefill side: save blocks to a segment{name[4:]})" if name.startswith("save") else name
            print(f"  {label:52s} {rate:7.2f} GB/s   {ratio}")
        for kib, times in chunk_sweep(nbytes, count, args.streams[0], args.sweep_chunk_kib).items():
            print(f"  grpc, {args.streams[0]} streams, chunks of {kib:5d} KiB      {gbps(times):7.2f} GB/s   "
                  f"{gbps(times) / rates['raw socket']:5.2f} x raw socket")


if __name__ == "__main__":
    main()
