"""The load generator against a real (simulated-engine) deployment: counts, latencies, goodput, outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dynamo_grpc.cli import main
from dynamo_grpc.client import RouterClient
from dynamo_grpc.loadgen import (
    Lengths,
    Objectives,
    Workload,
    router_sender,
    run_load,
    summarize,
    write_outputs,
)
from tests.cluster import MODEL, running


def test_lengths_and_shared_prefixes() -> None:
    rng = random.Random(1)
    assert Lengths("7").draw(rng) == 7
    assert all(3 <= Lengths("uniform:3:5").draw(rng) <= 5 for _ in range(50))
    assert Lengths("normal:1:0").draw(rng) == 1
    with pytest.raises(ValueError, match="uniform:LO:HI"):
        Lengths("zipf:1")
    prompts = Workload(requests=6, input_tokens=Lengths("20"), shared_prefix_tokens=8, prefix_groups=2).prompts()
    assert len({tuple(p[:8]) for p, _ in prompts}) <= 2 and all(len(p) == 20 for p, _ in prompts)
    assert prompts == Workload(requests=6, input_tokens=Lengths("20"), shared_prefix_tokens=8,
                               prefix_groups=2).prompts()


@pytest.mark.parametrize("rate", [0.0, 200.0])
async def test_a_run_reports_every_request(rate: float, tmp_path: Path) -> None:
    workload = Workload(requests=24, input_tokens=Lengths("uniform:20:60"), output_tokens=Lengths("8"),
                        concurrency=4, rate=rate)
    async with running() as stubs:
        async with RouterClient(stubs.deployment.router.endpoint) as client:
            records = await run_load(router_sender(client, MODEL), workload, progress=False)
        await stubs.assert_no_leaks()
    summary = summarize(records, Objectives(ttft_ms=10_000, itl_ms=10_000))
    assert summary["requests"] == 24 and summary["failed"] == 0
    assert all(len(r.token_times) == 8 for r in records)
    assert 0 < summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p99"] <= summary["e2e_ms"]["p99"]
    assert summary["output_tokens_per_s"] == pytest.approx(8 * summary["requests_per_s"])
    assert summary["goodput_requests_per_s"] == pytest.approx(summary["requests_per_s"])
    # An objective nobody meets leaves no goodput.
    assert summarize(records, Objectives(ttft_ms=0.0, itl_ms=0.0))["goodput_requests_per_s"] == 0
    write_outputs(records, summary, json_path=tmp_path / "run.json", plot_path=tmp_path / "run.png")
    assert len(json.loads((tmp_path / "run.json").read_text())["requests"]) == 24
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_command_refuses_a_bad_length_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--isl", "zipf:2", "--router", "127.0.0.1:1"]) == 2
    assert "uniform:LO:HI" in capsys.readouterr().err
