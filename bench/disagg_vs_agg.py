"""Goodput per GPU, disaggregated vs aggregated, on simulated H100s with the 70B-shaped calibrated cost model.

Workload: ISL 3000 / OSL 150, Poisson arrivals. For each GPU count, each side sweeps its configurations
(aggregated: the chunked-prefill budget that rides with decodes; disaggregated: the prefill/decode split)
and the arrival rate. A configuration's goodput is the highest Poisson rate at which at least 90% of
requests meet both objectives (found by bisection); a side's score is its best goodput per GPU.
One node (8 GPUs) moves KV over NVLink; two nodes (16) over 400G RDMA. Runs on a virtual clock
(`dynamo_grpc.fleetsim`): minutes of serving per point, seconds of CPU.

    python bench/disagg_vs_agg.py [--gpus 8 16] [--requests 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dynamo_grpc.fleetsim import KV_MEMORY_GB, FleetShape, run_virtual, simulate
from dynamo_grpc.loadgen import Lengths, Workload, summarize
from dynamo_grpc.slo import Objectives

ATTAINMENT = 0.9
RATE_PER_GPU_BOUNDS = (0.02, 2.0)
BISECTIONS = 7
AGG_CHUNKS = (128, 256, 512, 1024, 2048)


def shapes(gpus: int) -> list[FleetShape]:
    link = "nvlink" if gpus <= 8 else "rdma_400g"
    splits = range(1, gpus) if gpus <= 8 else range(2, gpus, 2)
    return ([FleetShape(decode_workers=gpus, decode_chunk_tokens=c) for c in AGG_CHUNKS]
            + [FleetShape(decode_workers=gpus - p, prefill_workers=p, link=link) for p in splits])


def best_goodput(shape: FleetShape, requests: int, objectives: Objectives) -> dict[str, float]:
    """The highest rate at which this fleet still meets the objectives for 90% of requests."""
    low, high = (bound * shape.gpus for bound in RATE_PER_GPU_BOUNDS)
    best = {"goodput": 0.0, "ttft_p90_ms": 0.0, "tpot_p90_ms": 0.0}
    for _ in range(BISECTIONS):
        rate = (low * high) ** 0.5
        workload = Workload(requests=requests, input_tokens=Lengths("3000"), output_tokens=Lengths("150"),
                            rate=rate, seed=1)
        summary = summarize(run_virtual(simulate(shape, workload)), objectives)
        if summary["slo_attainment"] >= ATTAINMENT:
            low = rate
            best = {"goodput": rate, "ttft_p90_ms": summary["ttft_ms"]["p90"],
                    "tpot_p90_ms": summary["tpot_ms"]["p90"]}
        else:
            high = rate
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--requests", type=int, default=300, help="requests per simulated point")
    parser.add_argument("--ttft-ms", type=float, default=2000.0, help="TTFT objective")
    parser.add_argument("--itl-ms", type=float, default=100.0, help="objective for a request's mean inter-token latency")
    parser.add_argument("--json", default="", help="write every point here")
    args = parser.parse_args()
    objectives = Objectives(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms)
    print(f"70B-shaped on simulated H100s, ISL 3000 / OSL 150, objectives TTFT <= {objectives.ttft_ms:g} ms and "
          f"mean ITL <= {objectives.itl_ms:g} ms for {ATTAINMENT:.0%} of requests, {KV_MEMORY_GB:g} GB of KV per GPU")
    results = []
    for gpus in args.gpus:
        started = time.time()
        print(f"\n{gpus} GPUs\n  {'configuration':<34} {'goodput':>8} {'per GPU':>8} {'TTFT p90':>9} {'TPOT p90':>9}")
        rows = []
        for shape in shapes(gpus):
            best = best_goodput(shape, args.requests, objectives)
            rows.append((shape, best))
            print(f"  {shape.describe():<34} {best['goodput']:>8.2f} "
                  f"{best['goodput'] / gpus:>8.3f} {best['ttft_p90_ms']:>7.0f}ms {best['tpot_p90_ms']:>7.1f}ms",
                  flush=True)
        agg = max((r for r in rows if not r[0].prefill_workers), key=lambda r: r[1]["goodput"])
        dis = max((r for r in rows if r[0].prefill_workers), key=lambda r: r[1]["goodput"])
        gain = dis[1]["goodput"] / agg[1]["goodput"] if agg[1]["goodput"] else float("inf")
        print(f"  best aggregated:    {agg[0].describe()}: {agg[1]['goodput'] / gpus:.3f} req/s per GPU")
        print(f"  best disaggregated: {dis[0].describe()}: {dis[1]['goodput'] / gpus:.3f} req/s per GPU")
        print(f"  disaggregated / aggregated goodput per GPU: {gain:.2f}x   ({time.time() - started:.0f} s)",
              file=sys.stdout, flush=True)
        results += [{"gpus": gpus, "configuration": s.describe(), **b} for s, b in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"objectives": vars(objectives), "points": results}, f, indent=1)


if __name__ == "__main__":
    main()
