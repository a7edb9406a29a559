"""The pairing table: only compatible engines pair, same-host pairs first."""

from __future__ import annotations

from control_plane.pairing import compute_pairings
from dynamo_grpc.v1 import common_pb2 as pb


def worker(worker_id: str, role: int, *, host: str = "a", model: str = "m", fingerprint: str = "fp") -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=worker_id, role=role, host=host, model=model, engine_fingerprint=fingerprint)


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


def test_no_decode_workers_means_no_pairs() -> None:
    assert not compute_pairings([worker("p", pb.WORKER_ROLE_PREFILL)]).pairings
