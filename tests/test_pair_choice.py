"""A routing decision at fleet scale picks what ranking every pair picked: the pair choice over groups, the
router's view of the tables (groups, pairs one by one, none), and the bit-mask prefix index each answer as
the plain version did, over random fleets, loads, caches and turns (ties abound)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest

from dynamo_grpc.kv.events import PrefixIndex, block_hashes
from dynamo_grpc.registry import PAIRINGS_DOCUMENT, MemoryRegistry
from dynamo_grpc.routing.fleet import Fleet
from dynamo_grpc.routing.pair_choice import Side, candidate_sides, choose_pair
from dynamo_grpc.routing.pairing import (
    MAX_LISTED_PAIRS,
    PairGroup,
    compute_pairings,
    groups_of,
    pairing_groups,
    pairing_table,
)
from dynamo_grpc.routing.policies import POLICIES, Load, Rank, rank_pair
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import kv_events_pb2 as events_pb

P, D = pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE

# How each policy ranked a pair before ranks were split into the two workers' parts.
RANKED_BEFORE: dict[str, Callable[[str, str, bool, Load], Rank]] = {
    "kv_aware": lambda p, d, same, load: (load.prefill_work(p), load.requests_at(d), load.kv_usage(d),
                                          not same),
    "least_loaded": lambda p, d, same, load: (load.requests_at(d) + load.requests_at(p), load.kv_usage(d),
                                              not same),
    "round_robin": lambda p, d, same, load: (),
}


def ranked_every_pair(sides: list[Side], policy: str, load: Load, host: dict[str, str], turn: int
                      ) -> tuple[str, str]:
    """The choice as it was: every pair sorted by ids, from one further each turn, the first of the best."""
    pairs = sorted((p, d) for side in sides for p in side.prefills for d in side.decodes)
    start = turn % len(pairs)
    return min(pairs[start:] + pairs[:start],
               key=lambda pair: RANKED_BEFORE[policy](*pair, host[pair[0]] == host[pair[1]], load))


def random_fleet(rng: random.Random) -> list[pb.WorkerInfo]:
    workers = []
    for group in range(rng.randint(1, 3)):
        for role, name in ((P, "p"), (D, "d")):
            for index in range(rng.randint(1, 6)):
                worker_id = f"{name}{group}-{index}-{rng.randrange(100)}"
                workers.append(pb.WorkerInfo(worker_id=worker_id, role=role, model="m", endpoint="x:1",
                                             engine_fingerprint=f"fp{group}", host=rng.choice("abc")))
    return workers


def random_load(rng: random.Random, workers: list[pb.WorkerInfo]) -> Load:
    requests = {w.worker_id: rng.choice((0, 0, 1, 2)) for w in workers}
    kv = {w.worker_id: rng.choice((0.0, 0.0, 0.25, 0.5)) for w in workers}
    work = {w.worker_id: rng.choice((0, 0, 16, 32)) for w in workers}
    return Load(requests_at=requests.__getitem__, kv_usage=kv.__getitem__, prefill_work=work.__getitem__)


def test_a_pairs_rank_is_its_workers_parts_added_as_before() -> None:
    rng = random.Random(3)
    for _ in range(200):
        workers = random_fleet(rng)
        load = random_load(rng, workers)
        p, d = rng.choice(workers).worker_id, rng.choice(workers).worker_id
        same = rng.random() < 0.5
        for name, policy in POLICIES.items():
            assert rank_pair(policy, p, d, same, load) == RANKED_BEFORE[name](p, d, same, load)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_choosing_from_groups_picks_the_pair_ranking_every_pair_picked(policy: str) -> None:
    rng = random.Random(policy)
    chose_differently = 0
    for _ in range(600):
        workers = random_fleet(rng)
        host = {w.worker_id: w.host for w in workers}
        live = {w.worker_id for w in workers if rng.random() < 0.85}
        decodes = {w.worker_id for w in workers if w.role == D and rng.random() < 0.85}
        groups = groups_of(pairing_table(workers))
        sides = candidate_sides(groups, live, decodes)
        if not sides:
            continue
        load = random_load(rng, workers)
        for turn in rng.sample(range(200), 5):
            chosen = choose_pair(sides, POLICIES[policy], load, host.__getitem__, turn)
            assert chosen == ranked_every_pair(sides, policy, load, host, turn)
            next_turn = choose_pair(sides, POLICIES[policy], load, host.__getitem__, turn + 1)
            chose_differently += chosen != next_turn
    assert chose_differently > 50  # turns matter: equals take turns


def test_the_table_lists_groups_and_small_fleets_pairs_and_either_form_reads_back_the_same() -> None:
    rng = random.Random(5)
    for _ in range(100):
        workers = random_fleet(rng)
        every_pair = {(p.prefill_worker_id, p.decode_worker_id) for p in compute_pairings(workers).pairings}
        table = pairing_table(workers, version=4)
        assert table.version == 4 and list(table.pairings) == list(compute_pairings(workers).pairings)
        for form in (table, cp_pb.PairingTable(pairings=table.pairings),
                     cp_pb.PairingTable(groups=table.groups)):
            groups = groups_of(form)
            assert {(p, d) for g in groups for p in g.prefills for d in g.decodes} == every_pair
            listed = [p for g in groups for p in g.prefills]
            assert len(listed) == len(set(listed))  # no prefill worker in two groups
    big = [pb.WorkerInfo(worker_id=f"w{i:03d}", role=P if i % 2 else D, model="m", host=f"h{i % 8}")
           for i in range(2 * 65)]
    table = pairing_table(big)
    assert 65 * 65 > MAX_LISTED_PAIRS and not table.pairings and len(table.groups) == 1
    assert len(table.SerializeToString()) < 2000  # 4,225 pairs as one group of 130 ids


def test_a_prefill_worker_listed_in_two_groups_pairs_with_the_decode_workers_of_both() -> None:
    table = cp_pb.PairingTable(groups=[
        cp_pb.PairingGroup(prefill_worker_ids=["p1", "p2"], decode_worker_ids=["d1"]),
        cp_pb.PairingGroup(prefill_worker_ids=["p2"], decode_worker_ids=["d2"])])
    assert sorted(groups_of(table), key=lambda g: g.prefills) == [PairGroup(("p1",), ("d1",)),
                                                                  PairGroup(("p2",), ("d1", "d2"))]
    assert pairing_groups([pb.WorkerInfo(worker_id="p", role=P)]) == []


@pytest.mark.parametrize("policy", list(POLICIES))
async def test_the_fleet_routes_as_ranking_every_pair_did_from_either_table_form(policy: str) -> None:
    rng = random.Random(f"fleet-{policy}")
    for _ in range(20):
        workers = random_fleet(rng)
        fleets = []
        for form in ("groups", "pairs", "none"):
            registry = MemoryRegistry()
            for worker in workers:
                await registry.register(worker)
            if form != "none":
                table = pairing_table(workers) if form == "groups" else compute_pairings(workers)
                await registry.put_document(PAIRINGS_DOCUMENT, table.SerializeToString())
            fleet = Fleet(registry, routing=policy, load_poll_s=0)
            await fleet.start()
            fleets.append((fleet, registry))
        assert all(f.pairing_table is not None for f, _ in fleets[:2]) and fleets[2][0].pairing_table is None
        host = {w.worker_id: w.host for w in workers}
        every_pair = compute_pairings(workers).pairings
        with contextlib.ExitStack() as in_flight:
            requests: dict[str, int] = {w.worker_id: 0 for w in workers}
            for turn in range(40):
                all_decodes = sorted(w.worker_id for w in workers if w.role == D)
                exclude = set(rng.sample(all_decodes, rng.randrange(len(all_decodes))))  # leaves one at least
                decodes = set(all_decodes) - exclude
                routes = [f.route("m", f"r{turn}", prompt_tokens=64, exclude=exclude) for f, _ in fleets]
                chosen = {(r.prefill.worker_id if r.prefill else "", r.decode.worker_id) for r in routes}
                assert len(chosen) == 1
                route = routes[0]
                in_flight_tokens = {w: 64 * count for w, count in requests.items()}  # 64 prompt tokens each
                load = Load(requests_at=requests.__getitem__, kv_usage=lambda w: 0.0,
                            prefill_work=in_flight_tokens.__getitem__)
                sides = [Side([p.prefill_worker_id], [p.decode_worker_id]) for p in every_pair
                         if p.decode_worker_id in decodes]
                if sides:
                    assert (route.prefill.worker_id, route.decode.worker_id) == ranked_every_pair(
                        sides, policy, load, host, turn)
                else:
                    assert route.prefill is None and route.decode.worker_id in decodes
                for fleet, _ in fleets:
                    in_flight.enter_context(fleet.busy(route.decode))
                    if route.prefill is not None:
                        in_flight.enter_context(fleet.busy(route.prefill, 64))
                requests[route.decode.worker_id] += 1
                if route.prefill is not None:
                    requests[route.prefill.worker_id] += 1
        for fleet, registry in fleets:
            await fleet.stop()
            await registry.close()


def test_the_prefix_index_answers_as_a_set_per_block_did() -> None:
    rng = random.Random(11)
    index, holders = PrefixIndex(), {}  # holders: the plain model, worker -> (block size, held hashes)
    prompts = {size: [[rng.randrange(50) for _ in range(size * rng.randint(1, 12))] for _ in range(6)]
               for size in (4, 8)}
    workers = [f"w{i}" for i in range(70)]  # more workers than bits in a machine word
    for step in range(3000):
        worker = rng.choice(workers)
        size = holders.get(worker, (rng.choice((4, 8)), set()))[0]
        prompt = rng.choice(prompts[size])
        hashes = block_hashes(prompt, size)[:rng.randint(0, len(prompt) // size)]
        action = rng.random()
        if action < 0.05:
            index.forget(worker)
            holders.pop(worker, None)
        elif action < 0.15:
            index.apply(worker, events_pb.WatchKvEventsResponse(reset=True, stored_block_hashes=hashes,
                                                                block_size=size))
            holders[worker] = (size, set(hashes))
        elif action < 0.4:
            index.apply(worker, events_pb.WatchKvEventsResponse(removed_block_hashes=hashes, block_size=size))
            holders.setdefault(worker, (size, set()))[1].difference_update(hashes)
        else:
            index.apply(worker, events_pb.WatchKvEventsResponse(stored_block_hashes=hashes, block_size=size))
            holders.setdefault(worker, (size, set()))[1].update(hashes)
        if step % 10 == 0:
            asked = rng.sample(workers, rng.randint(1, len(workers)))
            for prompt in (rng.choice(prompts[4]), rng.choice(prompts[8])):
                expected = {}
                for worker, (size, held) in holders.items():
                    depth = 0
                    for h in block_hashes(prompt, size):
                        if h not in held:
                            break
                        depth += 1
                    if depth:
                        expected[worker] = depth * size
                assert index.cached_tokens(prompt) == expected
                assert index.cached_tokens(prompt, asked) == {w: t for w, t in expected.items() if w in asked}
            assert all(index.blocks_held(w) == (len(holders[w][1]) if w in holders else 0) for w in workers)
