"""Which prefill workers may feed which decode workers: the rule the control plane publishes a table by, and
that a router falls back on while it has no table.

Two workers pair only when they serve the same model with the same engine fingerprint (KV bytes are
meaningless to an engine with another layout). Same-host pairs come first so routers prefer them.
"""

from __future__ import annotations

from collections.abc import Iterable

from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb


def compatible(prefill: pb.WorkerInfo, decode: pb.WorkerInfo) -> bool:
    return prefill.model == decode.model and prefill.engine_fingerprint == decode.engine_fingerprint


def compute_pairings(workers: Iterable[pb.WorkerInfo], *, version: int = 0) -> cp_pb.PairingTable:
    """Every compatible (prefill, decode) pair, same-host first, then by ids for a stable order."""
    workers = list(workers)
    prefills = [w for w in workers if w.role == pb.WORKER_ROLE_PREFILL]
    decodes = [w for w in workers if w.role == pb.WORKER_ROLE_DECODE]
    pairs = [cp_pb.Pairing(prefill_worker_id=p.worker_id, decode_worker_id=d.worker_id, same_host=p.host == d.host)
             for p in prefills for d in decodes if compatible(p, d)]
    pairs.sort(key=lambda pair: (not pair.same_host, pair.prefill_worker_id, pair.decode_worker_id))
    return cp_pb.PairingTable(pairings=pairs, version=version)
