"""Routing and the control plane at fleet scale: how a routing decision and a re-pairing grow with the fleet.

routing   One router's `Fleet.route` (prefix lookup + pair choice) on a fleet of N workers (half prefill, half
          decode, 8 to a host, one model and engine fingerprint, so every prefill worker pairs with every
          decode worker) whose prefix index holds B blocks. The fleet follows a real `PairingController` over an
          in-memory registry; the index is fed the workers' caches directly (no KV-event feeds from N fake
          workers). Prompts are 2-8k tokens: one of 64 shared prefixes (1-6k tokens, all starting with one
          256-token system prompt every worker holds) plus a question of its own. Each cached prefix sits, in
          part or whole, on 3 workers; random blocks fill the rest of the index. Requests stay in flight for
          a while (2 per decode worker), so the loads differ. Printed: p50/p99/max of `route` per policy.
repair    The control plane re-pairing a fleet of N registered workers (half prefill, half decode, 8 hosts)
          in a real etcd: each host is a process holding one etcd lease per worker (`EtcdRegistry`, TTL
          `--lease-ttl`); the control plane is `dynamo-grpc control-plane`; a router's `Fleet` follows the
          registry and the table. Two losses: one worker's lease revoked (from the revoke), and a whole host
          killed (SIGKILL; from the first of its keys etcd deletes when the leases expire, as a watcher sees
          it). Printed: time until the new table is in etcd, and until the router's Fleet holds it.

    python bench/fleet_scale.py                       # both, up to 1,000 workers and 1M blocks (minutes)
    python bench/fleet_scale.py routing --block-size 32
    python bench/fleet_scale.py --small               # seconds: 16 and 64 workers, 10k blocks
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane.controller import PairingController
from dynamo_grpc.kv.events import block_hashes
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.routing.fleet import Fleet
from dynamo_grpc.routing.policies import POLICIES, routing_policy
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import kv_events_pb2 as events_pb

MODEL = "bench-model"
FINGERPRINT = "fp-1"
WORKERS_PER_HOST = 8
PREFIXES = 64
SYSTEM_TOKENS = 256
COPIES = 3
VOCAB = 128_000


def worker_infos(count: int, hosts: int | None = None) -> list[pb.WorkerInfo]:
    """`count` workers, half prefill and half decode, spread over hosts (8 to a host unless `hosts` is given)."""
    hosts = hosts or max(1, count // WORKERS_PER_HOST)
    infos = []
    for index in range(count):
        role = pb.WORKER_ROLE_PREFILL if index % 2 == 0 else pb.WORKER_ROLE_DECODE
        name = "prefill" if role == pb.WORKER_ROLE_PREFILL else "decode"
        host = f"host-{index % hosts}"
        infos.append(pb.WorkerInfo(worker_id=f"{name}-{index // 2:04d}", role=role, model=MODEL, host=host,
                                   endpoint=f"{host}:{50000 + index}", engine_fingerprint=FINGERPRINT,
                                   engine="simulated"))
    return infos


# ---------------------------------------------------------------------------------------------------------
# A routing decision.


@dataclass
class Workload:
    """Shared prefixes, where the index caches them, and the requests."""

    prefixes: list[list[int]]
    cached: dict[str, list[int]]
    """worker id -> the block hashes its cache holds"""
    requests: list[tuple[int, ...]]


def workload(workers: list[str], blocks: int, block_size: int, requests: int, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    system = [rng.randrange(VOCAB) for _ in range(SYSTEM_TOKENS)]
    prefixes = [system + [rng.randrange(VOCAB) for _ in range(rng.randrange(768, 5888))] for _ in range(PREFIXES)]
    cached: dict[str, list[int]] = {w: list(block_hashes(system, block_size)) for w in workers}
    budget = blocks - sum(map(len, cached.values()))
    for prefix in prefixes:  # as many prefixes as fit in 60% of the index, each on a few workers
        hashes = block_hashes(prefix, block_size)
        holders = rng.sample(workers, min(COPIES, len(workers)))
        depths = [rng.randrange(len(hashes) // 2, len(hashes) + 1) for _ in holders]
        if sum(depths) > budget - 0.4 * blocks:
            break
        for holder, depth in zip(holders, depths):
            cached[holder] += hashes[:depth]
        budget -= sum(depths)
    per_worker, extra = divmod(max(budget, 0), len(workers))
    for index, worker in enumerate(workers):  # other content: blocks no prompt here names
        cached[worker] += [rng.getrandbits(64) for _ in range(per_worker + (index < extra))]
    prompts = []
    for _ in range(requests):
        prefix = rng.choice(prefixes)
        length = max(rng.randrange(2048, 8193), len(prefix) + block_size)
        prompts.append(tuple(prefix + [rng.randrange(VOCAB) for _ in range(length - len(prefix))]))
    return Workload(prefixes, cached, prompts)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


async def following_fleet(infos: list[pb.WorkerInfo]) -> tuple[Fleet, PairingController, MemoryRegistry]:
    """A router's Fleet following the registry and the control plane's table, as in production; it starts
    on a policy without KV-event feeds (the bench feeds the index itself) and without load polling."""
    registry = MemoryRegistry()
    for info in infos:
        await registry.register(info)
    controller = PairingController(registry)
    await controller.start()
    fleet = Fleet(registry, routing="round_robin", load_poll_s=0)
    await fleet.start()
    for _ in range(1000):
        if len(fleet.workers) == len(infos) and await fleet.until_paired(0.01):
            break
    return fleet, controller, registry


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1] / 1e6}


async def route_timings(fleet: Fleet, prompts: list[tuple[int, ...]], *, warmup: int
                        ) -> tuple[list[int], list[int]]:
    """Nanoseconds per `route`, wall and CPU; each routed request stays in flight for the next 2 x (decode
    workers)."""
    decodes = sum(1 for w in fleet.workers.values() if w.role == pb.WORKER_ROLE_DECODE)
    in_flight: collections.deque[contextlib.ExitStack] = collections.deque()
    wall, cpu = [], []
    for index, prompt in enumerate(prompts):
        started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
        route = fleet.route(MODEL, f"r{index}", prompt=prompt)
        elapsed, elapsed_cpu = time.perf_counter_ns() - started, time.thread_time_ns() - started_cpu
        if index >= warmup:
            wall.append(elapsed)
            cpu.append(elapsed_cpu)
        busy = contextlib.ExitStack()
        busy.enter_context(fleet.busy(route.decode, 0 if route.prefill else route.uncached_tokens))
        if route.prefill is not None:
            busy.enter_context(fleet.busy(route.prefill, route.uncached_tokens))
        in_flight.append(busy)
        if len(in_flight) > 2 * decodes:
            in_flight.popleft().close()
    while in_flight:
        in_flight.popleft().close()
    return wall, cpu


def hit_share(fleet: Fleet, prompts: list[tuple[int, ...]]) -> float:
    """Share of prompt tokens some worker's cache holds (the longest cached prefix of each prompt)."""
    workers = list(fleet.workers)
    hit = sum(max(fleet.prefix_index.cached_tokens(p, workers).values(), default=0) for p in prompts)
    return hit / sum(map(len, prompts))


async def routing_bench(sizes: list[int], block_counts: list[int], block_size: int, requests: int
                        ) -> list[dict[str, object]]:
    print(f"\nA routing decision: Fleet.route, block size {block_size}, prompts 2-8k tokens of {PREFIXES} "
          f"shared prefixes, {requests} requests per row")
    print("ms per decision: wall p50, wall p99, CPU p99 (the CPU time of the routing thread: on a shared machine,\n"
          "wall p99 also counts the time other processes held the CPU)")
    print(f"{'workers':>7} {'blocks':>9} {'B/block':>7} {'hits':>5}   "
          + "   ".join(f"{name:>23}" for name in POLICIES))
    rows = []
    for size in sizes:
        infos = worker_infos(size)
        fleet, controller, registry = await following_fleet(infos)
        for blocks in block_counts:
            load = workload([w.worker_id for w in infos], blocks, block_size, requests)
            before = rss()
            for worker_id, hashes in load.cached.items():
                fleet.prefix_index.apply(worker_id, events_pb.WatchKvEventsResponse(
                    reset=True, stored_block_hashes=hashes, block_size=block_size))
            indexed = sum(map(len, load.cached.values()))
            load.cached.clear()
            bytes_per_block = (rss() - before) / indexed
            hits = hit_share(fleet, load.requests[:200])
            row: dict[str, object] = {"workers": size, "blocks": indexed, "block_size": block_size,
                                      "bytes_per_block": round(bytes_per_block), "hit_share": round(hits, 3)}
            cells = []
            for name in POLICIES:
                fleet.routing = routing_policy(name)
                wall, cpu = await route_timings(fleet, load.requests, warmup=min(100, requests // 10))
                stats = row[name] = {**percentiles(wall), "cpu": percentiles(cpu)}
                cells.append(f"{stats['p50_ms']:7.3f} {stats['p99_ms']:7.3f} {stats['cpu']['p99_ms']:7.3f}")
            print(f"{size:>7} {indexed:>9,} {bytes_per_block:>7.0f} {hits:>5.2f}   " + "   ".join(cells), flush=True)
            rows.append(row)
            for info in infos:
                fleet.prefix_index.forget(info.worker_id)
        await fleet.stop()
        await controller.stop()
        await registry.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["routing", "repair"], metavar="{routing,repair}",
                        help="which benchmarks (default: both)")
    parser.add_argument("--small", action="store_true", help="a few seconds: 16 and 64 workers, 10k blocks")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="fleet sizes")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="indexed blocks (routing)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=None, help="routed requests per row")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    parts = args.parts
    if not set(parts) <= {"routing", "repair"}:
        parser.error(f"benchmarks are routing and repair, got {' '.join(parts)}")
    sizes = args.workers or ([16, 64] if args.small else [16, 64, 256, 1000])
    results: dict[str, object] = {}
    if "routing" in parts:
        blocks = args.blocks or ([10_000] if args.small else [10_000, 100_000, 1_000_000])
        requests = args.requests or (300 if args.small else 2000)
        results["routing"] = asyncio.run(routing_bench(sizes, blocks, args.block_size, requests))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
