"""The fleet-scale benchmark at toy size: every routing policy decides over a fed prefix index, and the
control plane re-pairs after a revoked lease and a killed host (real etcd, real processes). Times are
printed, not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_grpc.routing.policies import POLICIES

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "fleet_scale.py"


@pytest.mark.slow
@pytest.mark.etcd
def test_small_run_routes_every_policy_and_repairs_after_each_loss(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(BENCH), "--small", "--json", str(out)], capture_output=True,
                         text=True, timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    routing = result["routing"]
    assert [(row["workers"], row["blocks"]) for row in routing] == [(16, 10_000), (64, 10_000)]
    for row in routing:
        assert row["hit_share"] > 0.05 and 0 < row["bytes_per_block"] < 1000  # prompts found cached prefixes
        for policy in POLICIES:
            times = row[policy]
            assert 0 < times["p50_ms"] <= times["p99_ms"] <= times["max_ms"], (row["workers"], policy)
            assert 0 < times["best_of_3"]["p99_ms"], (row["workers"], policy)
    repair = result["repair"]
    assert [row["workers"] for row in repair] == [16, 64]
    for row in repair:
        assert row["host_workers"] == row["workers"] // 8  # a whole host's workers left the table
        assert 0 < row["revoke_published_s"] and 0 < row["revoke_router_s"]
        assert row["killed_to_router_s"] > 1  # the killed host's leases expired (TTL 3 s), none was revoked
        assert 0 < row["table_bytes"] < 1.5 * 2**20  # under etcd's request limit
    assert "p99" in run.stdout and "lease loss" in run.stdout
