"""Which prefill workers may feed which decode workers: the rule the control plane publishes a table by, and
that a router falls back on while it has no table.

Two workers pair only when they serve the same model with the same engine fingerprint (KV bytes are
meaningless to an engine with another layout) and share a KV transport. Same-host pairs come first so
routers prefer them. Each pair lists its transports in the order the decode worker tries them
(`kv_transports`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb

TRANSPORT_PREFERENCE = (pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_NIXL, pb.KV_TRANSPORT_GRPC)
"""Fastest first: in place on one host, then a NIXL READ, then gRPC streams."""
LEGACY_TRANSPORTS = (pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_GRPC)
"""What a worker that registers no transports offers."""


def compatible(prefill: pb.WorkerInfo, decode: pb.WorkerInfo) -> bool:
    return prefill.model == decode.model and prefill.engine_fingerprint == decode.engine_fingerprint


def kv_transports(prefill: pb.WorkerInfo, decode: pb.WorkerInfo) -> list[int]:
    """The transports both workers have, in order of preference; shm only on one host."""
    shared = set(_offered(prefill)) & set(_offered(decode))
    if prefill.host != decode.host:
        shared.discard(pb.KV_TRANSPORT_SHM)
    return [transport for transport in TRANSPORT_PREFERENCE if transport in shared]


def _offered(worker: pb.WorkerInfo) -> Sequence[int]:
    return worker.kv_transports or LEGACY_TRANSPORTS


def compute_pairings(workers: Iterable[pb.WorkerInfo], *, version: int = 0) -> cp_pb.PairingTable:
    """Every compatible (prefill, decode) pair with a transport in common, same-host first, then by ids for
    a stable order."""
    workers = list(workers)
    prefills = [w for w in workers if w.role == pb.WORKER_ROLE_PREFILL]
    decodes = [w for w in workers if w.role == pb.WORKER_ROLE_DECODE]
    pairs = [cp_pb.Pairing(prefill_worker_id=p.worker_id, decode_worker_id=d.worker_id, same_host=p.host == d.host,
                           kv_transports=transports)
             for p in prefills for d in decodes if compatible(p, d) and (transports := kv_transports(p, d))]
    pairs.sort(key=lambda pair: (not pair.same_host, pair.prefill_worker_id, pair.decode_worker_id))
    return cp_pb.PairingTable(pairings=pairs, version=version)
