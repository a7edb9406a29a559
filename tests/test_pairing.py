"""The pairing table: only compatible engines pair, same-host pairs first."""

from __future__ import annotations

import asyncio

from dynamo_grpc.registry import PAIRINGS_DOCUMENT, MemoryRegistry
from dynamo_grpc.routing.fleet import Fleet
from dynamo_grpc.routing.pairing import compute_pairings, pair_transports, pairing_table, unpaired
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb


def worker(worker_id: str, role: int, *, host: str = "a", model: str = "m", fingerprint: str = "fp",
           transports: tuple[int, ...] = ()) -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=worker_id, role=role, host=host, model=model,
                         engine_fingerprint=fingerprint, kv_transports=transports)


def test_only_compatible_workers_pair_and_same_host_comes_first() -> None:
    P, D = pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE
    table = compute_pairings([
        worker("p-far", P, host="b"), worker("p-near", P, host="a"),
        worker("p-other-model", P, model="other"), worker("p-other-engine", P, fingerprint="fp2"),
        worker("d", D, host="a"), worker("r", pb.WORKER_ROLE_ROUTER),
    ], version=7)
    assert [(p.prefill_worker_id, p.decode_worker_id, p.same_host) for p in table.pairings] == [
        ("p-near", "d", True), ("p-far", "d", False)]
    assert table.version == 7


def test_each_pair_lists_the_transports_both_workers_have_fastest_first() -> None:
    P, D = pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE
    SHM, NIXL, GRPC = pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_NIXL, pb.KV_TRANSPORT_GRPC
    everything = (GRPC, NIXL, SHM)  # a worker lists them in any order
    table = compute_pairings([
        worker("p-near", P, host="a", transports=everything),
        worker("p-far", P, host="b", transports=everything),
        worker("p-old", P, host="a"),  # registered before workers listed transports: shm and gRPC
        worker("p-nixl-only", P, host="b", transports=(NIXL,)),
        worker("d", D, host="a", transports=everything), worker("d-grpc", D, host="b", transports=(GRPC,)),
    ])
    transports = {(p.prefill_worker_id, p.decode_worker_id): list(p.kv_transports) for p in table.pairings}
    assert transports == {
        ("p-near", "d"): [SHM, NIXL, GRPC],  # one host: in place first
        ("p-far", "d"): [NIXL, GRPC],  # shm does not cross hosts
        ("p-old", "d"): [SHM, GRPC],
        ("p-nixl-only", "d"): [NIXL],
        ("p-near", "d-grpc"): [GRPC], ("p-far", "d-grpc"): [GRPC], ("p-old", "d-grpc"): [GRPC],
        # p-nixl-only and d-grpc share no transport: no pair.
    }


async def test_a_group_lists_its_transports_and_each_pair_routes_with_its_own() -> None:
    P, D = pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE
    SHM, NIXL, GRPC = pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_NIXL, pb.KV_TRANSPORT_GRPC
    workers = [worker("p-near", P, host="a", transports=(SHM, NIXL, GRPC)),
               worker("p-far", P, host="b", transports=(SHM, GRPC)),
               worker("d", D, host="a", transports=(GRPC, NIXL, SHM))]
    table = pairing_table(workers)
    assert [list(group.kv_transports) for group in table.groups] == [[SHM, NIXL, GRPC]]
    listed = {(p.prefill_worker_id, p.decode_worker_id): list(p.kv_transports) for p in table.pairings}
    assert listed == {("p-near", "d"): [SHM, NIXL, GRPC], ("p-far", "d"): [GRPC]}
    by_id = {w.worker_id: w for w in workers}
    assert all(pair_transports(table.groups[0].kv_transports, by_id[p], by_id[d]) == transports
               for (p, d), transports in listed.items())
    # A table of groups only (a large fleet's): the router derives each pair's transports from its group's.
    routes = await routes_from_groups(workers, table, requests=4)
    assert {r.prefill.worker_id: list(r.kv_transports) for r in routes if r.prefill} == {
        "p-near": [SHM, NIXL, GRPC], "p-far": [GRPC]}


async def test_a_pair_with_no_transport_in_common_prefills_on_its_decode_worker() -> None:
    P, D = pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE
    workers = [worker("p", P, host="a", transports=(pb.KV_TRANSPORT_NIXL,)),
               worker("d", D, host="a", transports=(pb.KV_TRANSPORT_GRPC,))]
    table = pairing_table(workers)
    assert not table.groups[0].kv_transports and not table.pairings
    assert pair_transports(table.groups[0].kv_transports, *workers) == []
    [route] = await routes_from_groups(workers, table, requests=1)
    assert route.decode.worker_id == "d" and route.prefill is None and not route.kv_transports


async def routes_from_groups(workers: list[pb.WorkerInfo], table: cp_pb.PairingTable, *,
                             requests: int) -> list:
    """Routes of a router that reads `table`'s groups only."""
    registry = MemoryRegistry()
    for info in workers:
        await registry.register(info)
    groups_only = cp_pb.PairingTable(groups=table.groups, version=1)
    await registry.put_document(PAIRINGS_DOCUMENT, groups_only.SerializeToString())
    fleet = Fleet(registry, routing="round_robin", load_poll_s=0)
    await fleet.start()
    try:
        assert fleet.pairing_table == groups_only
        return [fleet.route("m", f"r{turn}", prompt_tokens=8) for turn in range(requests)]
    finally:
        await fleet.stop()
        await registry.close()


def test_workers_at_different_tensor_parallel_sizes_do_not_pair_and_the_table_says_why() -> None:
    P, D = pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE
    engine = "vllm-0.32.0/tiny/float32/kv-float32/bs32/L4xH2xD64"
    workers = [worker("p", P, fingerprint=f"{engine}/tp2h1"), worker("d", D, fingerprint=f"{engine}/tp1h2"),
               worker("p-other-model", P, model="other"), worker("d-other-model", D, model="other")]
    assert [(p.prefill_worker_id, p.decode_worker_id) for p in compute_pairings(workers).pairings] == [
        ("p-other-model", "d-other-model")]
    assert unpaired(workers) == [
        f"model m: prefill workers of {engine}/tp2h1 and decode workers of {engine}/tp1h2 do not pair. The "
        "engines differ in tensor parallelism only (tp2h1 vs tp1h2): KV moves only between equal "
        "tensor-parallel sizes (it is not re-sharded between them); give prefill and decode workers the same "
        "--tensor-parallel-size."]


def test_no_decode_workers_means_no_pairs() -> None:
    assert not compute_pairings([worker("p", pb.WORKER_ROLE_PREFILL)]).pairings


async def test_the_fleet_restarts_a_failed_registry_watch() -> None:
    from dynamo_grpc.registry import MemoryRegistry, RegistryUnavailable
    from dynamo_grpc.routing.fleet import Fleet

    class FlakyRegistry(MemoryRegistry):
        failures = 1

        async def watch_workers(self):  # type: ignore[override]
            if self.failures:
                self.failures -= 1
                raise RegistryUnavailable("etcd is restarting")
            async for snapshot in super().watch_workers():
                yield snapshot

    registry = FlakyRegistry()
    fleet = Fleet(registry)
    await asyncio.wait_for(fleet.start(), timeout=5)
    await registry.register(pb.WorkerInfo(worker_id="d1", role=pb.WORKER_ROLE_DECODE, model="m", endpoint="x:1"))
    for _ in range(50):
        if "d1" in fleet.workers:
            break
        await asyncio.sleep(0.02)
    assert "d1" in fleet.workers and registry.failures == 0
    await fleet.stop()
    await registry.close()
