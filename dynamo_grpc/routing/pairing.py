"""Which prefill workers may feed which decode workers: the rule the control plane publishes a table by, and
that a router falls back on while it has no table.

Two workers pair only when they serve the same model with the same engine fingerprint (KV bytes are
meaningless to an engine with another layout), so the pairs form groups, all with all: one per model and
fingerprint. The table lists the groups, which stay small at any fleet size (500 + 500 workers are 250,000
pairs, several MiB one by one, past etcd's 1.5 MiB request limit); while the pairs are few it lists them one
by one as well, same-host first, for routers that predate groups.

How a pair moves KV: each group lists the transports its pairs may use, in the order a decode worker tries
them (shm, then NIXL, then gRPC); a pair uses those of them that both its workers registered, shm only on one
host (`pair_transports`). A pair with none in common prefills on its decode worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dynamo_grpc.kv.fingerprint import mismatch_hint
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

MAX_LISTED_PAIRS = 4096
"""A table lists its pairs one by one too while they are at most this many (about 150 KB)."""
TRANSPORT_PREFERENCE = (pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_NIXL, pb.KV_TRANSPORT_GRPC)
"""Fastest first: in place on one host, then a NIXL READ, then gRPC streams."""
LEGACY_TRANSPORTS = (pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_GRPC)
"""What a worker that registers no transports offers."""


@dataclass(frozen=True)
class PairGroup:
    """Workers that pair all with all: each prefill worker may feed each decode worker."""

    prefills: tuple[str, ...]
    """Sorted; no prefill worker is in two groups of one table."""
    decodes: tuple[str, ...]
    """Sorted."""


def pairing_groups(workers: Iterable[pb.WorkerInfo]) -> list[cp_pb.PairingGroup]:
    """One group per model and engine fingerprint with workers of both roles, in that order, with the
    transports some prefill and some decode worker of it registered."""
    by_kind: dict[tuple[str, str], tuple[list[pb.WorkerInfo], list[pb.WorkerInfo]]] = {}
    for worker in workers:
        if worker.role in (pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE):
            prefills, decodes = by_kind.setdefault((worker.model, worker.engine_fingerprint), ([], []))
            (prefills if worker.role == pb.WORKER_ROLE_PREFILL else decodes).append(worker)
    return [cp_pb.PairingGroup(model=model, engine_fingerprint=fingerprint,
                               prefill_worker_ids=sorted(w.worker_id for w in prefills),
                               decode_worker_ids=sorted(w.worker_id for w in decodes),
                               kv_transports=_group_transports(prefills, decodes))
            for (model, fingerprint), (prefills, decodes) in sorted(by_kind.items()) if prefills and decodes]


def unpaired(workers: Iterable[pb.WorkerInfo]) -> list[str]:
    """Why prefill and decode workers of one model do not pair: one line per pair of engine fingerprints that
    only one of the roles runs (e.g. tensor-parallel sizes that differ)."""
    by_model: dict[str, tuple[set[str], set[str]]] = {}
    for worker in workers:
        if worker.role in (pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE):
            prefills, decodes = by_model.setdefault(worker.model, (set(), set()))
            (prefills if worker.role == pb.WORKER_ROLE_PREFILL else decodes).add(worker.engine_fingerprint)
    return [f"model {model}: prefill workers of {produced} and decode workers of {wanted} do not pair. "
            + mismatch_hint(produced, wanted)
            for model, (prefills, decodes) in sorted(by_model.items())
            for produced in sorted(prefills - decodes) for wanted in sorted(decodes - prefills)]


def pair_transports(group_transports: Sequence[int], prefill: pb.WorkerInfo, decode: pb.WorkerInfo
                    ) -> list[int]:
    """How one pair moves KV, in the order tried: its group's transports that both workers registered, shm
    only on one host. An empty `group_transports` (a table that predates transports) means all of them."""
    shared = set(_offered(prefill)).intersection(_offered(decode))
    if prefill.host != decode.host:
        shared.discard(pb.KV_TRANSPORT_SHM)
    return [transport for transport in group_transports or TRANSPORT_PREFERENCE if transport in shared]


def _offered(worker: pb.WorkerInfo) -> Sequence[int]:
    return worker.kv_transports or LEGACY_TRANSPORTS


def _group_transports(prefills: Iterable[pb.WorkerInfo], decodes: Iterable[pb.WorkerInfo]) -> list[int]:
    """The transports some prefill worker and some decode worker registered, fastest first."""
    offered_by_prefills = {transport for worker in prefills for transport in _offered(worker)}
    offered_by_decodes = {transport for worker in decodes for transport in _offered(worker)}
    return [t for t in TRANSPORT_PREFERENCE if t in offered_by_prefills and t in offered_by_decodes]


def compute_pairings(workers: Iterable[pb.WorkerInfo], *, version: int = 0) -> cp_pb.PairingTable:
    """Every compatible (prefill, decode) pair with a transport in common, one by one, same-host first, then
    by ids for a stable order."""
    workers = list(workers)
    by_id = {w.worker_id: w for w in workers}
    pairs = [cp_pb.Pairing(prefill_worker_id=p, decode_worker_id=d, same_host=by_id[p].host == by_id[d].host,
                           kv_transports=transports)
             for group in pairing_groups(workers)
             for p in group.prefill_worker_ids for d in group.decode_worker_ids
             if (transports := pair_transports(group.kv_transports, by_id[p], by_id[d]))]
    pairs.sort(key=lambda pair: (not pair.same_host, pair.prefill_worker_id, pair.decode_worker_id))
    return cp_pb.PairingTable(pairings=pairs, version=version)


def pairing_table(workers: Iterable[pb.WorkerInfo], *, version: int = 0) -> cp_pb.PairingTable:
    """The table the control plane publishes: the groups, and the pairs one by one while they are few."""
    workers = list(workers)
    table = cp_pb.PairingTable(groups=pairing_groups(workers), version=version)
    if sum(len(g.prefill_worker_ids) * len(g.decode_worker_ids) for g in table.groups) <= MAX_LISTED_PAIRS:
        table.pairings.extend(compute_pairings(workers).pairings)
    return table


def groups_of(table: cp_pb.PairingTable) -> list[PairGroup]:
    """A table's pairs as groups: its own groups, or (a table that predates them) its pairs, gathered by
    prefill worker, those that feed the same decode workers in one group. A prefill worker listed in two
    groups pairs with the decode workers of both."""
    decodes_of: dict[str, frozenset[str]] = {}
    for group in table.groups:
        decodes = frozenset(group.decode_worker_ids)
        for prefill in group.prefill_worker_ids:
            listed = decodes_of.get(prefill)
            decodes_of[prefill] = decodes if listed is None else listed | decodes
    if not table.groups:
        pairs: dict[str, set[str]] = {}
        for pair in table.pairings:
            pairs.setdefault(pair.prefill_worker_id, set()).add(pair.decode_worker_id)
        decodes_of = {prefill: frozenset(decodes) for prefill, decodes in pairs.items()}
    prefills_of: dict[frozenset[str], list[str]] = {}
    for prefill, decodes in decodes_of.items():
        prefills_of.setdefault(decodes, []).append(prefill)
    return [PairGroup(tuple(sorted(prefills)), tuple(sorted(decodes)))
            for decodes, prefills in prefills_of.items() if decodes]
