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
import array
import asyncio
import collections
import contextlib
import gc
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Collection
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from control_plane.controller import PairingController
from dynamo_grpc.event_loop import run as run_on_loop
from dynamo_grpc.kv.events import block_hashes
from dynamo_grpc.registry import PAIRINGS_DOCUMENT, EtcdRegistry, MemoryRegistry
from dynamo_grpc.routing.fleet import Fleet
from dynamo_grpc.routing.pairing import groups_of
from dynamo_grpc.routing.policies import POLICIES, routing_policy
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import kv_events_pb2 as events_pb
from tests.etcd_server import EtcdServer

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
        host = f"host-{index // 2 % hosts}"  # as many prefill as decode workers on each
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
    requests: list[array.array]
    """The prompts' token ids, compact: a prompt becomes a tuple of fresh ints just before it is routed, as
    a router parses a request just before it routes it (old ints, cold in the CPU caches, cost more)."""


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
        prompts.append(array.array("I", prefix + [rng.randrange(VOCAB) for _ in range(length - len(prefix))]))
    return Workload(prefixes, cached, prompts)


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


async def route_timings(fleet: Fleet, prompts: list[array.array], *, warmup: int
                        ) -> tuple[list[int], list[int], list[int]]:
    """Nanoseconds per decision: wall and CPU time of the first `route` of each request, and the least CPU
    time of three tries of it (the same prompt and load, one turn further each); each routed request stays
    in flight for the next 2 x (decode workers)."""
    decodes = sum(1 for w in fleet.workers.values() if w.role == pb.WORKER_ROLE_DECODE)
    in_flight: collections.deque[contextlib.ExitStack] = collections.deque()
    wall, cpu, best = [], [], []
    for index, ids in enumerate(prompts):
        prompt = tuple(ids)
        tries = []
        for _ in range(3):  # the same decision three times: the quickest shows it without other processes
            started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
            route = fleet.route(MODEL, f"r{index}", prompt=prompt)
            tries.append((time.perf_counter_ns() - started, time.thread_time_ns() - started_cpu))
        if index >= warmup:
            wall.append(tries[0][0])
            cpu.append(tries[0][1])
            best.append(min(t for _, t in tries))
        busy = contextlib.ExitStack()
        busy.enter_context(fleet.busy(route.decode, 0 if route.prefill else route.uncached_tokens))
        if route.prefill is not None:
            busy.enter_context(fleet.busy(route.prefill, route.uncached_tokens))
        in_flight.append(busy)
        if len(in_flight) > 2 * decodes:
            in_flight.popleft().close()
    while in_flight:
        in_flight.popleft().close()
    return wall, cpu, best


def hit_share(fleet: Fleet, prompts: list[array.array]) -> float:
    """Share of prompt tokens some worker's cache holds (the longest cached prefix of each prompt)."""
    workers = list(fleet.workers)
    hit = sum(max(fleet.prefix_index.cached_tokens(tuple(p), workers).values(), default=0) for p in prompts)
    return hit / sum(map(len, prompts))


async def routing_bench(sizes: list[int], block_counts: list[int], block_size: int, requests: int
                        ) -> list[dict[str, object]]:
    print(f"\nA routing decision: Fleet.route, block size {block_size}, prompts 2-8k tokens of {PREFIXES} "
          f"shared prefixes, {requests} requests per row")
    print("ms per decision: wall p50 and p99; CPU p99 (this thread's CPU time) and best-of-3 CPU p99 (the least of\n"
          "three tries of each decision). On a shared machine, wall time also counts the time other processes\n"
          "held the CPU, and CPU time their contention for caches and cores: best-of-3 is the closest to a quiet one")
    print(f"{'workers':>7} {'blocks':>9} {'B/block':>7} {'hits':>5}   "
          + "   ".join(f"{name:>27}" for name in POLICIES))
    rows = []
    for size in sizes:
        infos = worker_infos(size)
        fleet, controller, registry = await following_fleet(infos)
        for blocks in block_counts:
            load = workload([w.worker_id for w in infos], blocks, block_size, requests)
            caches = [(worker_id, events_pb.WatchKvEventsResponse(reset=True, stored_block_hashes=hashes,
                                                                  block_size=block_size))
                      for worker_id, hashes in load.cached.items()]
            indexed = sum(map(len, load.cached.values()))
            load.cached.clear()
            gc.collect()
            tracemalloc.start()  # what the index allocates for them
            for worker_id, cache in caches:
                fleet.prefix_index.apply(worker_id, cache)
            bytes_per_block = tracemalloc.get_traced_memory()[0] / indexed
            tracemalloc.stop()
            del caches
            hits = hit_share(fleet, load.requests[:200])
            row: dict[str, object] = {"workers": size, "blocks": indexed, "block_size": block_size,
                                      "bytes_per_block": round(bytes_per_block), "hit_share": round(hits, 3)}
            cells = []
            for name in POLICIES:
                fleet.routing = routing_policy(name)
                wall, cpu, best = await route_timings(fleet, load.requests, warmup=min(100, requests // 10))
                stats = row[name] = {**percentiles(wall), "cpu": percentiles(cpu), "best_of_3": percentiles(best)}
                cells.append(f"{stats['p50_ms']:6.3f} {stats['p99_ms']:6.3f} {stats['cpu']['p99_ms']:6.3f} "
                             f"{stats['best_of_3']['p99_ms']:6.3f}")
            print(f"{size:>7} {indexed:>9,} {bytes_per_block:>7.0f} {hits:>5.2f}   " + "   ".join(cells), flush=True)
            rows.append(row)
            for info in infos:
                fleet.prefix_index.forget(info.worker_id)
        await fleet.stop()
        await controller.stop()
        await registry.close()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Re-pairing after a lease loss.

REPAIR_HOSTS = 8
NAMESPACE = "fleet-scale"


def host_agent(etcd: str, namespace: str, infos: list[bytes], lease_ttl_s: int, commands: Connection) -> None:
    """One host: an etcd lease per worker (`EtcdRegistry`), as each worker process keeps its own. Answers
    `revoke <worker>` with the time it revoked that worker's lease."""

    async def serve() -> None:
        workers = [pb.WorkerInfo.FromString(info) for info in infos]
        registries = {w.worker_id: EtcdRegistry([etcd], namespace=namespace, lease_ttl_s=lease_ttl_s)
                      for w in workers}
        for batch in range(0, len(workers), 32):
            await asyncio.gather(*(registries[w.worker_id].connect() for w in workers[batch:batch + 32]))
            await asyncio.gather(*(registries[w.worker_id].register(w) for w in workers[batch:batch + 32]))
        commands.send("ready")
        while True:
            command, worker_id = await asyncio.to_thread(commands.recv)
            assert command == "revoke"
            revoked_at = time.monotonic()
            await registries.pop(worker_id).close()
            commands.send(revoked_at)

    run_on_loop(serve())


@dataclass
class Host:
    process: multiprocessing.process.BaseProcess
    commands: Connection
    workers: list[str]


def start_hosts(etcd: str, namespace: str, infos: list[pb.WorkerInfo], lease_ttl_s: int) -> list[Host]:
    context = multiprocessing.get_context("spawn")
    hosts = []
    for host in range(REPAIR_HOSTS):
        mine = [w for w in infos if w.host == f"host-{host}"]
        ours, theirs = context.Pipe()
        process = context.Process(target=host_agent, daemon=True,
                                  args=(etcd, namespace, [w.SerializeToString() for w in mine], lease_ttl_s, theirs))
        process.start()
        hosts.append(Host(process, ours, [w.worker_id for w in mine]))
    for host in hosts:
        if not host.commands.poll(120):
            raise RuntimeError("a host agent did not register its workers within 120 s")
        assert host.commands.recv() == "ready"
    return hosts


def paired_ids(table: cp_pb.PairingTable | None) -> set[str]:
    """Every worker the table pairs, whatever its form."""
    return set() if table is None else {w for g in groups_of(table) for w in (*g.prefills, *g.decodes)}


class Watchers:
    """When each worker left the registry and when each table reached etcd, as watchers in this process
    see them, and the router's Fleet, polled every millisecond."""

    def __init__(self, registry: EtcdRegistry, fleet: Fleet) -> None:
        self.fleet = fleet
        self.left: dict[str, float] = {}
        self.tables: list[tuple[float, set[str]]] = []
        self.fleet_tables: list[tuple[float, set[str]]] = []
        self._tasks = [asyncio.create_task(self._follow_workers(registry)),
                       asyncio.create_task(self._follow_table(registry)),
                       asyncio.create_task(self._poll_fleet())]

    async def _follow_workers(self, registry: EtcdRegistry) -> None:
        known: set[str] = set()
        async for workers in registry.watch_workers():
            now = time.monotonic()
            for worker_id in known - workers.keys():
                self.left[worker_id] = now
            known = set(workers)

    async def _follow_table(self, registry: EtcdRegistry) -> None:
        async for data in registry.watch_document(PAIRINGS_DOCUMENT):
            now = time.monotonic()
            if data is not None:
                self.tables.append((now, paired_ids(cp_pb.PairingTable.FromString(data))))

    async def _poll_fleet(self) -> None:
        seen = None
        while True:
            table = self.fleet.pairing_table
            if table is not seen:
                self.fleet_tables.append((time.monotonic(), paired_ids(table)))
                seen = table
            await asyncio.sleep(0.001)

    @staticmethod
    def first_without(tables: list[tuple[float, set[str]]], workers: Collection[str], after: float) -> float | None:
        return next((at for at, ids in tables if at >= after and ids.isdisjoint(workers)), None)

    def repaired(self, workers: Collection[str], after: float) -> tuple[float, float] | tuple[()]:
        """When the first table without `workers` reached etcd, and the router's Fleet; () until both."""
        published = self.first_without(self.tables, workers, after)
        seen = self.first_without(self.fleet_tables, workers, after)
        return () if published is None or seen is None else (published, seen)

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout:g} s")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def start_control_plane(etcd: str, namespace: str, tree: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "dynamo_grpc.cli", "control-plane", "--etcd", etcd,
                                 "--namespace", namespace, "--port", "0"], cwd=tree, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(tree)},
                                start_new_session=True)


async def repair_one_size(etcd: str, size: int, lease_ttl_s: int, tree: Path, log_dir: Path, revokes: int
                          ) -> dict[str, object]:
    namespace = f"{NAMESPACE}-{size}"
    infos = worker_infos(size, hosts=REPAIR_HOSTS)
    control_plane = start_control_plane(etcd, namespace, tree, log_dir / f"control-plane-{size}.log")
    hosts: list[Host] = []
    registry = EtcdRegistry([etcd], namespace=namespace)
    await registry.connect()
    fleet = Fleet(registry, routing="round_robin", load_poll_s=0)
    watchers = None
    try:
        started = time.monotonic()
        hosts = await asyncio.to_thread(start_hosts, etcd, namespace, infos, lease_ttl_s)
        await fleet.start()
        watchers = Watchers(registry, fleet)
        everyone = {w.worker_id for w in infos}
        await watchers.until(lambda: paired_ids(fleet.pairing_table) == everyone, 120, "the first full table")
        registered_s = time.monotonic() - started
        # (1) One worker's lease revoked, on several hosts in turn.
        revoked = []
        for index in range(revokes):
            host = hosts[index % len(hosts)]
            worker_id = host.workers.pop(index % 2)  # a prefill worker, then a decode worker
            host.commands.send(("revoke", worker_id))
            revoked_at = await asyncio.to_thread(host.commands.recv)
            await watchers.until(lambda w=worker_id, t=revoked_at: watchers.repaired([w], t), 30,
                                 f"a table without {worker_id}")
            published, seen = watchers.repaired([worker_id], revoked_at)
            revoked.append({"published_s": published - revoked_at, "router_s": seen - revoked_at})
        # (2) A host killed: its leases expire; from each key's deletion to a table without that worker.
        victim = hosts[-1]
        killed_at = time.monotonic()
        victim.process.kill()
        await watchers.until(lambda: watchers.repaired(victim.workers, killed_at) and watchers.left.keys() >= set(
            victim.workers), lease_ttl_s + 30, "a table without the killed host's workers")
        deleted = [watchers.left[w] for w in victim.workers]
        published, seen = watchers.repaired(victim.workers, killed_at)
        per_worker = sorted(watchers.first_without(watchers.fleet_tables, [w], killed_at) - watchers.left[w]
                            for w in victim.workers)
        table_bytes = len(fleet.pairing_table.SerializeToString()) if fleet.pairing_table else 0
        return {"workers": size, "registered_s": registered_s, "table_bytes": table_bytes,
                "revoke_published_s": max(r["published_s"] for r in revoked),
                "revoke_router_s": max(r["router_s"] for r in revoked),
                "host_workers": len(victim.workers), "host_expiry_spread_s": max(deleted) - min(deleted),
                "host_published_s": published - max(deleted), "host_router_s": seen - max(deleted),
                "host_worker_router_max_s": per_worker[-1], "killed_to_router_s": seen - killed_at}
    finally:
        if watchers is not None:
            await watchers.stop()
        await fleet.stop()
        await registry.close()
        for host in hosts:
            host.process.kill()
            host.process.join()
        control_plane.terminate()
        control_plane.wait(10)


async def repair_bench(sizes: list[int], lease_ttl_s: int, tree: Path, revokes: int) -> list[dict[str, object]]:
    print(f"\nRe-pairing after a lease loss: real etcd, `dynamo-grpc control-plane` from {tree}, {REPAIR_HOSTS} "
          f"host processes holding a lease per worker (TTL {lease_ttl_s} s)")
    print("seconds from the loss to the new table in etcd / in the router's Fleet; revoke: the worst of "
          f"{revokes} single-lease revokes; host killed: from the last of its keys etcd deleted")
    print(f"{'workers':>7} {'table':>8} {'revoke: etcd':>12} {'router':>7} {'host: workers':>13} "
          f"{'expiry spread':>13} {'etcd':>6} {'router':>7} {'worst worker':>12}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as scratch, EtcdServer(Path(scratch) / "etcd") as etcd:
        for size in sizes:
            row = await repair_one_size(etcd.endpoint, size, lease_ttl_s, tree, Path(scratch), revokes)
            print(f"{size:>7} {row['table_bytes']:>7,}B {row['revoke_published_s']:>12.3f} "
                  f"{row['revoke_router_s']:>7.3f} {row['host_workers']:>13} {row['host_expiry_spread_s']:>13.3f} "
                  f"{row['host_published_s']:>6.3f} {row['host_router_s']:>7.3f} "
                  f"{row['host_worker_router_max_s']:>12.3f}", flush=True)
            rows.append(row)
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
    parser.add_argument("--lease-ttl", type=int, default=3, help="seconds (repair)")
    parser.add_argument("--revokes", type=int, default=4, help="single-lease revokes per fleet size (repair)")
    parser.add_argument("--control-plane-tree", type=Path, default=REPO,
                        help="checkout whose control plane runs (repair; e.g. an older one, to compare)")
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
        results["routing"] = run_on_loop(routing_bench(sizes, blocks, args.block_size, requests))
    if "repair" in parts:
        results["repair"] = run_on_loop(repair_bench(sizes, args.lease_ttl, args.control_plane_tree.resolve(),
                                                     args.revokes))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
