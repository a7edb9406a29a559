"""`dynamo-grpc generate` and `bench` as a user runs them: a mistake gets one line on stderr saying what is
wrong and what to do, and exit status 1; never a traceback."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import pytest

from tests.cluster import MODEL, running
from tests.processes import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
async def router() -> AsyncIterator[str]:
    async with running() as stubs:
        yield stubs.deployment.router.endpoint


async def cli(*args: str) -> tuple[int, str, str]:
    """Run `dynamo-grpc ARGS` from this tree; its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dynamo_grpc.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "AioRpcError" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


async def test_generate_for_an_unknown_model_says_which_are_served(router: str) -> None:
    status, out, err = await cli("generate", "--router", router, "--model", "nope", "hi")
    assert (status, out) == (1, "")
    assert err.strip() == ("dynamo-grpc generate: MODEL_NOT_FOUND: model 'nope' is not served; served models: "
                           f"{MODEL}; pass one of them with --model")


async def test_generate_with_bad_sampling_names_the_field(router: str) -> None:
    status, _, err = await cli("generate", "--router", router, "--model", MODEL, "--max-tokens", "0", "hi")
    assert status == 1
    assert err.strip() == "dynamo-grpc generate: BAD_SAMPLING_PARAMS: sampling.max_tokens must be at least 1, got 0"


async def test_generate_without_a_router_says_how_to_start_one() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    status, _, err = await cli("generate", "--router", endpoint, "hi")
    line = err.strip()
    assert status == 1 and "\n" not in line, err
    assert line.startswith("dynamo-grpc generate: UNAVAILABLE: ")
    assert line.endswith(f"is a router running at {endpoint}? start one with `dynamo-grpc serve` or "
                         "`dynamo-grpc router`")


async def test_bench_for_an_unknown_model_fails_in_one_line(router: str) -> None:
    status, out, err = await cli("bench", "--router", router, "--model", "nope", "--requests", "4")
    assert (status, out) == (1, "")
    assert last_line(err) == ("dynamo-grpc bench: MODEL_NOT_FOUND: model 'nope' is not served; served models: "
                              f"{MODEL}; pass one of them with --model")


async def test_bench_without_a_router_fails_in_one_line() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    status, _, err = await cli("bench", "--router", endpoint, "--requests", "4")
    assert status == 1
    line = last_line(err)
    assert line.startswith("dynamo-grpc bench: UNAVAILABLE: ") and f"is a router running at {endpoint}?" in line


async def test_a_bad_workers_count_is_refused_by_name() -> None:
    status, _, err = await cli("frontend", "--workers", "many")
    assert status == 2 and last_line(err).endswith(
        "argument --workers: expected a number of processes or 'auto', got 'many'")
    status, _, err = await cli("router", "--workers", "-2")
    assert status == 2 and last_line(err).endswith("expected 0 or more processes (0: one per core), got -2")


async def test_serve_at_different_prefill_and_decode_tensor_parallel_sizes_says_why_not() -> None:
    status, _, err = await cli("serve", "--prefill-tensor-parallel-size", "2", "--decode-tensor-parallel-size",
                               "1", "--prompt", "hi")
    assert status == 2
    assert last_line(err) == (
        "dynamo-grpc serve: --prefill-tensor-parallel-size 2 with --decode-tensor-parallel-size 1: KV moves "
        "only between engines of equal tensor-parallel size (each decode rank loads the shard of the prefill "
        "rank of the same number; re-sharding between sizes is not built). Give both the same size.")
