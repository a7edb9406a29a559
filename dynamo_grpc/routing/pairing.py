"""Which prefill workers may feed which decode workers: the rule the control plane publishes a table by, and
that a router falls back on while it has no table.

Two workers pair only when they serve the same model with the same engine fingerprint (KV bytes are
meaningless to an engine with another layout), so the pairs form groups, all with all: one per model and
fingerprint. The table lists the groups, which stay small at any fleet size (500 + 500 workers are 250,000
pairs, several MiB one by one, past etcd's 1.5 MiB request limit); while the pairs are few it lists them one
by one as well, same-host first, for routers that predate groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

MAX_LISTED_PAIRS = 4096
"""A table lists its pairs one by one too while they are at most this many (about 150 KB)."""


@dataclass(frozen=True)
class PairGroup:
    """Workers that pair all with all: each prefill worker may feed each decode worker."""

    prefills: tuple[str, ...]
    """Sorted; no prefill worker is in two groups of one table."""
    decodes: tuple[str, ...]
    """Sorted."""


def pairing_groups(workers: Iterable[pb.WorkerInfo]) -> list[cp_pb.PairingGroup]:
    """One group per model and engine fingerprint with workers of both roles, in that order."""
    by_kind: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for worker in workers:
        if worker.role in (pb.WORKER_ROLE_PREFILL, pb.WORKER_ROLE_DECODE):
            prefills, decodes = by_kind.setdefault((worker.model, worker.engine_fingerprint), ([], []))
            (prefills if worker.role == pb.WORKER_ROLE_PREFILL else decodes).append(worker.worker_id)
    return [cp_pb.PairingGroup(model=model, engine_fingerprint=fingerprint,
                               prefill_worker_ids=sorted(prefills), decode_worker_ids=sorted(decodes))
            for (model, fingerprint), (prefills, decodes) in sorted(by_kind.items()) if prefills and decodes]


def compute_pairings(workers: Iterable[pb.WorkerInfo], *, version: int = 0) -> cp_pb.PairingTable:
    """Every compatible (prefill, decode) pair one by one, same-host first, then by ids for a stable order."""
    workers = list(workers)
    host = {w.worker_id: w.host for w in workers}
    pairs = [cp_pb.Pairing(prefill_worker_id=p, decode_worker_id=d, same_host=host[p] == host[d])
             for group in pairing_groups(workers)
             for p in group.prefill_worker_ids for d in group.decode_worker_ids]
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
