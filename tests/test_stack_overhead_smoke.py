"""The stack-overhead benchmark at toy size: real processes serve every request in full, each layer's CPU
is counted, and nothing is left running (timings unchecked)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "stack_overhead.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stack_overhead", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.etcd
def test_small_run_serves_every_request_counts_every_layer_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(BENCH), "--small", "--json", str(out)], capture_output=True,
                         text=True, timeout=240, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"agg", "disagg"}
    for mode, runs in result["results"].items():
        (only,) = runs
        assert (only["requests"], only["failed"], only["wrong_tokens"]) == (24, 0, 0), (mode, only["errors"])
        assert only["requests_per_s"] > 0 and only["ttft_p50_ms"] > 0, mode
        cpu = only["cpu_ms_per_request"]
        assert min(cpu["frontend"], cpu["decode"], cpu["client"]) > 0, (mode, cpu)
        assert "router" not in cpu and cpu["frontend+router"] == cpu["frontend"], cpu  # the router is inside
    assert result["results"]["disagg"][0]["cpu_ms_per_request"]["prefill"] > 0
    assert "target" in run.stdout and "<= 0.4" in run.stdout
    assert len(result["pids"]) >= 6  # etcd, control plane, prefill, decode, 2 frontends
    assert result["left_running"] == []
    assert not [pid for pid in result["pids"] if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_profile_summary_shares_busy_samples_by_function(tmp_path: Path) -> None:
    bench = load_bench()
    path = tmp_path / "p.speedscope.json"
    frames = [{"name": "serve", "file": "/x/a.py", "line": 1}, {"name": "encode", "file": "/x/b.py", "line": 7},
              {"name": "encode", "file": "/x/b.py", "line": 9}, {"name": "epoll_wait", "file": "/lib/libc.so.6"}]
    samples = [[0, 1], [0, 2], [0], [0, 3]]  # the last one waits: not CPU
    path.write_text(json.dumps({"shared": {"frames": frames}, "profiles": [
        {"type": "sampled", "name": "main", "samples": samples, "weights": [2.0, 1.0, 1.0, 4.0]}]}))
    summary = bench.summarize_profile(path)
    assert "busy 4.0 s of 8.0 s" in summary
    innermost, inclusive = summary.split("innermost Python function")[1].split("inclusive")
    assert "75.0%  encode (b.py)" in innermost and "25.0%  serve (a.py)" in innermost  # lines 7 and 9: one function
    assert "100.0%  serve (a.py)" in inclusive and "75.0%  encode (b.py)" in inclusive
