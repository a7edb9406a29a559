"""The virtual-clock fleet simulator: fast, deterministic, and showing the interference disaggregation removes."""

from __future__ import annotations

import asyncio
import time

from dynamo_grpc.fleetsim import FleetShape, run_virtual, simulate
from dynamo_grpc.loadgen import Lengths, Objectives, Workload, summarize


def test_the_virtual_clock_jumps_over_sleeps() -> None:
    async def nap() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.gather(asyncio.sleep(3600), asyncio.sleep(1800))
        return loop.time()

    started = time.perf_counter()
    assert run_virtual(nap()) == 3600
    assert time.perf_counter() - started < 1


def test_disaggregation_keeps_long_prefills_out_of_decode_steps() -> None:
    workload = Workload(requests=40, input_tokens=Lengths("3000"), output_tokens=Lengths("60"), rate=1.0)
    agg = summarize(run_virtual(simulate(FleetShape(decode_workers=2, decode_chunk_tokens=4096), workload)),
                    Objectives())
    dis = summarize(run_virtual(simulate(FleetShape(decode_workers=1, prefill_workers=1), workload)), Objectives())
    assert agg["failed"] == dis["failed"] == 0
    # A 70B-shaped 3000-token prefill takes ~670 ms; in an aggregated step it stalls every decode with it.
    assert agg["itl_ms"]["p99"] > 500 > 100 > dis["itl_ms"]["p99"]
    # The same run twice gives the same numbers: nothing depends on this machine's load.
    again = summarize(run_virtual(simulate(FleetShape(decode_workers=1, prefill_workers=1), workload)), Objectives())
    assert again["ttft_ms"] == dis["ttft_ms"] and again["duration_s"] == dis["duration_s"]
